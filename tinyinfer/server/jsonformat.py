"""``format: "json"`` (ollama) / ``response_format: json_object`` (OpenAI): constrained decoding.

:class:`JSONPrefix` is a byte-level pushdown recognizer of one JSON object (RFC 8259,
root an object, as ollama's and llama.cpp's JSON grammar have it): it says whether a
byte string can still grow into valid JSON, and when the object is complete.

:class:`JSONLogitsProcessor` plugs it into :meth:`Engine.generate` (``logits_processor``):
before each sampling step it walks the candidates from the most likely down, keeps the
first ``keep`` tokens whose bytes continue a valid prefix and masks every other token
to -inf. Once the object is closed only end-of-generation tokens remain, so the output
always parses unless ``max_tokens`` cuts it short (finish_reason "length"). With greedy
decoding the result is exactly the model's best valid continuation; with sampling the
distribution is truncated to those ``keep`` tokens (a top-k over valid tokens). A JSON
schema given as ``format`` is not enforced beyond "a JSON object".
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["JSONPrefix", "JSONLogitsProcessor"]

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESC = frozenset(b'"\\/bfnrtu')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
MAX_WS_RUN = 24          # like llama.cpp's json grammar: bounded whitespace between tokens

# states (the stack holds "o" for objects and "a" for arrays, as a str: immutable, cheap to copy)
START, OBJ0, KEY, COLON, VALUE, ARR0, AFTER, END = "start", "obj0", "key", "colon", "value", "arr0", "after", "end"
# strings: "ks"/"vs" (key/value string), "ke"/"ve" (after a backslash), "ku3".."ku0" / "vu3".."vu0" (\\u digits)
# numbers: "n-" (after minus), "n0" (leading zero), "ni" (int), "n." (after dot), "nf" (fraction),
#          "ne" (after e/E), "nes" (after exponent sign), "nx" (exponent digits)
# literals: "l" + the bytes still expected, e.g. "lrue"
_NUM_DONE = frozenset(("n0", "ni", "nf", "nx"))

State = Tuple[str, str, int]      # (state, stack, whitespace run)


def _value_start(c: int, stack: str) -> Optional[Tuple[str, str]]:
    if c == 0x7B:                     # {
        return OBJ0, stack + "o"
    if c == 0x5B:                     # [
        return ARR0, stack + "a"
    if c == 0x22:                     # "
        return "vs", stack
    if c == 0x2D:                     # -
        return "n-", stack
    if c == 0x30:
        return "n0", stack
    if c in _DIGITS:
        return "ni", stack
    lit = _LITERALS.get(c)
    if lit is not None:
        return "l" + lit.decode(), stack
    return None


def _after_value(stack: str) -> str:
    return AFTER if stack else END


def step(state: State, c: int) -> Optional[State]:
    """Consume byte ``c``; the new state, or None if no JSON object can continue this way."""
    s, stack, ws = state
    # strings (the hot path: most bytes are inside strings)
    if s == "vs" or s == "ks":
        if c == 0x22:
            return (COLON if s == "ks" else _after_value(stack)), stack, 0
        if c == 0x5C:
            return s[0] + "e", stack, 0
        if c < 0x20:
            return None
        return state
    if s == "ve" or s == "ke":
        if c not in _ESC:
            return None
        if c == 0x75:   # u
            return s[0] + "u3", stack, 0
        return s[0] + "s", stack, 0
    if s[1:2] == "u" and s[0] in "kv" and len(s) == 3:
        if c not in _HEX:
            return None
        n = int(s[2])
        return (s[0] + "s" if n == 0 else s[:2] + str(n - 1)), stack, 0
    # numbers: a byte that cannot extend the number ends it and is read again after it
    if s[0] == "n":
        if s == "n-":
            if c == 0x30:
                return "n0", stack, 0
            return ("ni", stack, 0) if c in _DIGITS else None
        if s == "n0":
            if c == 0x2E:
                return "n.", stack, 0
            if c in (0x65, 0x45):
                return "ne", stack, 0
        elif s == "ni":
            if c in _DIGITS:
                return state
            if c == 0x2E:
                return "n.", stack, 0
            if c in (0x65, 0x45):
                return "ne", stack, 0
        elif s == "n.":
            return ("nf", stack, 0) if c in _DIGITS else None
        elif s == "nf":
            if c in _DIGITS:
                return state
            if c in (0x65, 0x45):
                return "ne", stack, 0
        elif s == "ne":
            if c in (0x2B, 0x2D):
                return "nes", stack, 0
            return ("nx", stack, 0) if c in _DIGITS else None
        elif s == "nes":
            return ("nx", stack, 0) if c in _DIGITS else None
        elif s == "nx":
            if c in _DIGITS:
                return state
        if s not in _NUM_DONE:
            return None
        return step((_after_value(stack), stack, 0), c)
    if s[0] == "l":       # literal: true / false / null
        if c != ord(s[1]):
            return None
        rest = s[2:]
        return (("l" + rest) if rest else _after_value(stack)), stack, 0
    # structure
    if c in _WS:
        if ws >= MAX_WS_RUN:
            return None
        return s, stack, ws + 1
    if s == START:
        return (OBJ0, "o", 0) if c == 0x7B else None
    if s == OBJ0:
        if c == 0x7D:
            return _after_value(stack[:-1]), stack[:-1], 0
        return ("ks", stack, 0) if c == 0x22 else None
    if s == KEY:
        return ("ks", stack, 0) if c == 0x22 else None
    if s == COLON:
        return (VALUE, stack, 0) if c == 0x3A else None
    if s == VALUE or s == ARR0:
        if s == ARR0 and c == 0x5D:
            return _after_value(stack[:-1]), stack[:-1], 0
        r = _value_start(c, stack)
        return None if r is None else (r[0], r[1], 0)
    if s == AFTER:
        top = stack[-1]
        if c == 0x2C:
            return (KEY if top == "o" else VALUE), stack, 0
        if (c == 0x7D and top == "o") or (c == 0x5D and top == "a"):
            return _after_value(stack[:-1]), stack[:-1], 0
        return None
    return None     # END: nothing but whitespace (handled above) may follow


class JSONPrefix:
    """Incremental recognizer: ``feed(bytes)`` -> bool (still a valid prefix); ``complete``."""

    def __init__(self):
        self.state: State = (START, "", 0)

    @staticmethod
    def advance(state: State, data: bytes) -> Optional[State]:
        for c in data:
            state = step(state, c)
            if state is None:
                return None
        return state

    def accepts(self, data: bytes) -> bool:
        return self.advance(self.state, data) is not None

    def feed(self, data: bytes) -> bool:
        st = self.advance(self.state, data)
        if st is None:
            return False
        self.state = st
        return True

    @property
    def complete(self) -> bool:
        return self.state[0] == END


def is_valid_json_object(text: str) -> bool:
    p = JSONPrefix()
    return p.feed(text.encode("utf-8")) and p.complete


class JSONLogitsProcessor:
    """``logits_processor(tokens, logits) -> logits`` for :meth:`Engine.generate`.

    ``tokens`` are the ids in the context (prompt first); the ids beyond what was seen on
    the previous call are the generated ones and advance the recognizer.
    """

    def __init__(self, tokenizer, keep: int = 64, first: int = 1024):
        self.tok = tokenizer
        self.keep = keep
        self.first = first
        self.json = JSONPrefix()
        self.n_seen: Optional[int] = None
        self.eog = np.array(sorted(tokenizer.eog_ids) if hasattr(tokenizer, "eog_ids")
                            else [tokenizer.eos_id], dtype=np.int64)
        self._eog_set = frozenset(int(t) for t in self.eog)

    def _bytes(self, t: int) -> bytes:
        return self.tok.token_to_bytes(int(t))

    def __call__(self, tokens, logits: np.ndarray) -> np.ndarray:
        if self.n_seen is None:
            self.n_seen = len(tokens)
        else:
            for t in tokens[self.n_seen:]:
                self.json.feed(self._bytes(t))
            self.n_seen = len(tokens)
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        if self.json.complete:
            out[self.eog] = logits[self.eog]
            return out
        n = logits.shape[0]
        k = min(self.first, n)
        cand = np.argpartition(-logits, k - 1)[:k] if k < n else np.arange(n)
        cand = cand[np.argsort(-logits[cand], kind="stable")]
        found = self._scan(cand, logits, out)
        if not found and k < n:          # rare: no valid token among the first candidates
            rest = np.argsort(-logits, kind="stable")[k:]
            found = self._scan(rest, logits, out)
        if not found:                     # nothing can continue: let it end
            out[self.eog] = logits[self.eog]
        return out

    def _scan(self, cand, logits, out) -> int:
        state, found = self.json.state, 0
        for t in cand.tolist():
            if t in self._eog_set:
                continue
            b = self._bytes(t)
            if not b or JSONPrefix.advance(state, b) is None:
                continue
            out[t] = logits[t]
            found += 1
            if found >= self.keep:
                break
        return found
