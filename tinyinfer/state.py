"""The saved-state format (``--prompt-cache`` files, ``Llama.save_state``).

    STATE_MAGIC | header length (4 bytes, little-endian) | JSON header | payload

The header holds the format version, the model's fingerprint (a state loads only into the model
and cache type it was made with), the tokens and the payload's sha256; the payload is the KV cells
of those tokens (as the model's ``cache_save`` writes them) followed by the last logits (float32).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

STATE_MAGIC = b"TINYINFER-STATE\n"


class StateError(ValueError):
    """A saved state (``--prompt-cache`` file, ``load_state``) that is corrupted or made for another model."""


def fingerprint(engine) -> dict:
    """What a state must match to load: the file, the vocabulary and the cache's layout."""
    return {"arch": engine.gguf.architecture, "n_vocab": int(engine.n_vocab),
            "file_size": os.path.getsize(engine.path), "name": str(engine.gguf.metadata.get("general.name", "")),
            "n_embd": int(getattr(engine.model, "n_embd", 0)), **engine.model.cache_fingerprint(engine.cache)}


def dump(engine) -> bytes:
    """The engine's sequence: tokens, KV cells and last logits."""
    n = len(engine.tokens)
    try:
        cells = engine.model.cache_save(engine.cache, engine.seq, n)
    except ValueError as e:
        raise StateError(str(e)) from None
    logits = np.zeros(0, np.float32) if engine.scores is None else np.asarray(engine.scores[-1], np.float32)
    payload = cells + logits.tobytes()
    head = {"version": 1, "model": fingerprint(engine), "tokens": [int(t) for t in engine.tokens],
            "n_logits": int(logits.size), "sha256": hashlib.sha256(payload).hexdigest()}
    hb = json.dumps(head).encode()
    return STATE_MAGIC + len(hb).to_bytes(4, "little") + hb + payload


def restore(engine, blob) -> None:
    """Load what :func:`dump` wrote into ``engine`` (whose context is reset first); StateError if it
    is damaged or made for another model, cache type or a larger context."""
    engine.reset()
    if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:len(STATE_MAGIC)]) != STATE_MAGIC:
        raise StateError("not a tinyinfer state (bad magic)")
    blob = bytes(blob)
    try:
        n_head = int.from_bytes(blob[len(STATE_MAGIC):len(STATE_MAGIC) + 4], "little")
        head = json.loads(blob[len(STATE_MAGIC) + 4:len(STATE_MAGIC) + 4 + n_head])
        payload = blob[len(STATE_MAGIC) + 4 + n_head:]
        tokens = [int(t) for t in head["tokens"]]
        n_logits = int(head["n_logits"])
        want = head["sha256"]
        version = head["version"]
    except (ValueError, KeyError, TypeError) as e:
        raise StateError(f"corrupted state header ({type(e).__name__}: {e})") from None
    if version != 1:
        raise StateError(f"state version {version} is not supported (this build reads version 1)")
    if hashlib.sha256(payload).hexdigest() != want:
        raise StateError("corrupted state: checksum mismatch (truncated or modified)")
    mine = fingerprint(engine)
    theirs = head.get("model") if isinstance(head.get("model"), dict) else {}
    if theirs != mine:
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        was = ", ".join(f"{k}={theirs.get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={mine[k]!r}" for k in diff)
        raise StateError(f"the state was saved with another model or cache ({was}; this one has {now})")
    n = len(tokens)
    if n > engine.n_ctx:
        raise StateError(f"the state holds {n} tokens, more than this context of {engine.n_ctx}")
    if n_logits not in (0, engine.n_vocab):
        raise StateError(f"corrupted state: {n_logits} logits for a vocabulary of {engine.n_vocab}")
    cells = len(payload) - 4 * n_logits
    try:
        engine.model.cache_load(engine.cache, engine.seq, n, payload[:max(cells, 0)])
    except ValueError as e:
        raise StateError(f"corrupted state: {e}") from None
    engine.tokens = tokens
    if n_logits:
        engine.scores = np.frombuffer(payload, np.float32, n_logits, cells).copy()[None, :]


def save_file(engine, path) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(dump(engine))
    os.replace(tmp, path)


def load_file(engine, path) -> None:
    with open(path, "rb") as f:
        blob = f.read()
    try:
        restore(engine, blob)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None
