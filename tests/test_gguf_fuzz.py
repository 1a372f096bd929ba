"""Robustness of tinyinfer.gguf: a malformed file ends in GGUFError, nothing else.

For every input the reader must either parse it or raise :class:`GGUFError` (a
``ValueError``) with a message: never another exception type, a crash, a hang, or
an allocation out of proportion to the file.

- targeted cases: bad magic, unsupported version, zero-length file, lengths and
  counts past the end or huge, unknown value / ggml types, >4 dims, bad shapes,
  data out of bounds, misaligned and overlapping tensors, duplicate keys and
  tensor names, bad ``general.alignment``, arrays nested too deep;
- truncation at every structural field boundary of small files, and at the key,
  value and tensor-info boundaries of the real SmolLM2 header (on a sparse copy);
- a seeded mutation loop (bit flips, byte overwrites, truncations, u64 length /
  count / dim / offset fields and u32 type fields set to hostile values at the
  offsets where they live — found by walking the header —, splices, duplicated
  key/values and tensor infos, insertions, deletions) over three base files: a
  small vocabulary-carrying file, the SmolLM2 header cut down to short arrays and
  four real tensors, and a v2 file with a 64-byte alignment. It runs in a
  subprocess under ``RLIMIT_AS`` (current size + 1 GiB) with a per-case timer,
  and reports counts, peak RSS growth and open file descriptors;
- hypothesis: random patches of the base files and random bytes after a header.

The long run: ``TINYINFER_FUZZ_N=200000 pytest -m slow tests/test_gguf_fuzz.py``,
or directly ``python tests/test_gguf_fuzz.py --n 200000 --jobs 2`` (prints JSON);
``--case I --seed S`` replays one case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for test_gguf when run as a script
from test_gguf import QT, U32_KINDS, U64_KINDS, VT, Field, GGUFBuilder  # noqa: E402

from tinyinfer.gguf import GGUFError, GGUFFile  # noqa: E402

HERE = Path(__file__).resolve()
NORMAL_N = 8000                     # mutation cases in the normal suite
SLOW_N = int(os.environ.get("TINYINFER_FUZZ_N", "200000"))
CASE_TIMEOUT_S = 5.0                # a single case taking this long is a hang
AS_HEADROOM = 1 << 30               # address space the worker may grow by
RSS_GROWTH_LIMIT = 256 << 20        # peak RSS the worker may grow by


# ------------------------------------------------------------------------------------------
# Base files
# ------------------------------------------------------------------------------------------

def base_mini() -> bytes:
    """A small file with a vocabulary (string / float / int arrays), every scalar type, and
    tensors of several ggml types."""
    b = GGUFBuilder()
    b.add("general.architecture", VT.STRING, "llama")
    b.add("general.name", VT.STRING, "fuzz-mini")
    for vt, v in [(VT.UINT8, 200), (VT.INT8, -3), (VT.UINT16, 60000), (VT.INT16, -300), (VT.UINT32, 30),
                  (VT.INT32, -7), (VT.FLOAT32, 1e-5), (VT.BOOL, True), (VT.UINT64, 2**40), (VT.INT64, -2**40),
                  (VT.FLOAT64, 1e6)]:
        b.add(f"llama.v{vt}", vt, v)
    tokens = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(40)] + ["▁über", "Ġthe", "🦙", ""]
    b.add("tokenizer.ggml.model", VT.STRING, "gpt2")
    b.add("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, tokens))
    b.add("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [-float(i) for i in range(len(tokens))]))
    b.add("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, [3, 3, 3] + [1] * (len(tokens) - 3)))
    b.add("tokenizer.ggml.merges", VT.ARRAY, (VT.STRING, ["Ġ t", "h e", "Ġt he", "i n", "a n"]))
    b.add("test.nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT16, [1, 2]), (VT.STRING, ["a", "bc"]), (VT.INT8, [])]))
    b.add_tensor("token_embd.weight", (32, 4), QT.Q8_0)
    b.add_tensor("blk.0.attn_norm.weight", (32,), QT.F32)
    b.add_tensor("blk.0.attn_q.weight", (32, 8), QT.Q4_0)
    b.add_tensor("blk.0.ffn_up.weight", (8, 4), QT.F16)
    b.add_tensor("blk.0.ffn_down.weight", (256, 2), QT.Q4_K)
    b.add_tensor("output.weight", (256, 1), QT.Q6_K)
    return b.build()[0]


def base_aligned_v2() -> bytes:
    b = GGUFBuilder(version=2, alignment=64)
    b.add("general.architecture", VT.STRING, "gemma3")
    b.add("gemma3.attention.sliding_window", VT.UINT32, 512)
    b.add("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["<pad>", "<eos>", "<bos>", "▁a"]))
    b.add("deep", VT.ARRAY, (VT.ARRAY, [(VT.ARRAY, [(VT.ARRAY, [(VT.FLOAT64, [1.0])])])]))
    b.add_tensor("a", (3,), QT.F32)
    b.add_tensor("b", (32, 3), QT.Q5_0)
    b.add_tensor("c", (2, 2, 2, 2), QT.F16)
    return b.build()[0]


_DTYPE_VT = {np.dtype(np.uint8): VT.UINT8, np.dtype(np.int8): VT.INT8, np.dtype(np.uint16): VT.UINT16,
             np.dtype(np.int16): VT.INT16, np.dtype(np.uint32): VT.UINT32, np.dtype(np.int32): VT.INT32,
             np.dtype(np.float32): VT.FLOAT32, np.dtype(np.bool_): VT.BOOL, np.dtype(np.uint64): VT.UINT64,
             np.dtype(np.int64): VT.INT64, np.dtype(np.float64): VT.FLOAT64}


def base_smollm2_mini(path) -> bytes:
    """The real SmolLM2 header: all its keys and value types, arrays cut to 40 items, and four
    real tensors cut to 4 rows (their real bytes)."""
    f = GGUFFile(path)
    b = GGUFBuilder(version=f.version)
    for key, vt in f.field_types.items():
        v = f.metadata[key]
        if vt == VT.ARRAY:
            if isinstance(v, np.ndarray):
                v = (_DTYPE_VT[v.dtype], v[:40].tolist())
            else:  # the real file has string arrays only
                v = (VT.STRING, [s.encode("utf-8", "surrogateescape") for s in v[:40]])
        b.add(key, vt, v)
    names = ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.ffn_down.weight", "blk.0.attn_k.weight"]
    for name in names:
        t = f.tensor(name)
        rows = min(t.data.shape[0], 4)
        ne = (t.shape[0], rows) if len(t.shape) > 1 else t.shape
        b.add_tensor(name, ne, t.ggml_type, t.data[:rows].tobytes())
    return b.build()[0]


def smollm2_path_or_none():
    try:
        from tinyinfer.fetch import fetch
        return fetch("smollm2", quiet=True)
    except Exception:  # no network and no cache: fuzz the synthetic bases only
        return None


# ------------------------------------------------------------------------------------------
# Layout walker (for valid files: where every length, count, type and offset field lies)
# ------------------------------------------------------------------------------------------

_SCALAR_SIZE = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
                VT.FLOAT32: 4, VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


def walk(data: bytes) -> list:
    """Fields of a *valid* GGUF file, same kinds as GGUFBuilder records (markers, strings,
    value types, array types/counts, scalars, tensor-info fields, padding, data)."""
    fields = []
    pos = 0

    def take(kind, fmt, what=""):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)[0]
        fields.append(Field(pos, struct.calcsize(fmt), kind, what))
        pos += struct.calcsize(fmt)
        return v

    def string(what):
        nonlocal pos
        n = take("strlen", "<Q", what)
        fields.append(Field(pos, n, "strbytes", what))
        s = data[pos:pos + n]
        pos += n
        return s

    def value(vt, what):
        nonlocal pos
        if vt in _SCALAR_SIZE:
            fields.append(Field(pos, _SCALAR_SIZE[vt], "scalar", what))
            pos += _SCALAR_SIZE[vt]
        elif vt == VT.STRING:
            string(what)
        else:
            et = take("atype", "<I", what)
            n = take("acount", "<Q", what)
            if et in _SCALAR_SIZE:  # one field for the whole block of numbers
                fields.append(Field(pos, n * _SCALAR_SIZE[et], "scalar", what))
                pos += n * _SCALAR_SIZE[et]
            else:
                for i in range(n):
                    value(et, f"{what}[]")  # "[]": an array element

    fields.append(Field(0, 4, "magic", ""))
    pos = 4
    take("version", "<I")
    n_tensors = take("n_tensors", "<Q")
    n_kv = take("n_kv", "<Q")
    align = 32
    for _ in range(n_kv):
        fields.append(Field(pos, 0, "kv", ""))
        key = string("key").decode("utf-8", "surrogateescape")
        vt = take("vtype", "<I", key)
        if key == "general.alignment":
            align = struct.unpack_from("<I", data, pos)[0]
        value(vt, key)
    infos = []
    for _ in range(n_tensors):
        fields.append(Field(pos, 0, "ti", ""))
        name = string("tensor").decode("utf-8", "surrogateescape")
        nd = take("n_dims", "<I", name)
        ne = [take("dim", "<Q", name) for _ in range(nd)]
        t = take("ggml_type", "<I", name)
        off = take("toffset", "<Q", name)
        infos.append((name, ne, t, off))
    pad = -pos % align
    if pad:
        fields.append(Field(pos, pad, "padding", ""))
    data_start = pos + pad
    from test_gguf import tensor_nbytes
    for name, ne, t, off in infos:
        fields.append(Field(data_start + off, tensor_nbytes(ne, t), "data", name))
    return fields


# ------------------------------------------------------------------------------------------
# Mutations
# ------------------------------------------------------------------------------------------

U64_VALUES = [0, 1, 2, 3, 7, 8, 0x7F, 0xFF, 0x1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40,
              2**48, 2**56, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
U32_VALUES = list(range(0, 16)) + [24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 38, 39, 40, 41, 42, 43,
                                   100, 1000, 2**16, 2**24, 2**31, 2**32 - 1]


def _u64_value(rng, old, data_len, off):
    r = rng.random()
    if r < 0.45:
        return rng.choice(U64_VALUES)
    if r < 0.75:  # just right / just past what is left in the file
        left = data_len - off - 8
        return max(0, rng.choice([left, left + 1, left - 1, left + 8, data_len, data_len + 1, left // 2]))
    if r < 0.9:
        return max(0, min(2**64 - 1, old + rng.choice([-2, -1, 1, 2, 32, -32, old, 1 << rng.randrange(64)])))
    return rng.getrandbits(64)


def _u32_value(rng, old):
    r = rng.random()
    if r < 0.7:
        return rng.choice(U32_VALUES)
    if r < 0.85:
        return max(0, min(2**32 - 1, old + rng.choice([-1, 1, 2, -2])))
    return rng.getrandbits(32)


def _region(fields, kind):
    """(start, end) of each consecutive kv or tensor info, from the markers."""
    marks = [f.offset for f in fields if f.kind == kind]
    ends = []
    for i, m in enumerate(marks):
        if i + 1 < len(marks):
            ends.append(marks[i + 1])
        else:  # the last one ends at the next structural marker of another section
            nxt = [f.offset for f in fields if f.offset > m and f.kind in ("ti", "padding", "data")]
            if kind == "ti":
                nxt = [f.offset for f in fields if f.offset > m and f.kind in ("padding", "data")]
            ends.append(min(nxt) if nxt else None)
    return [(s, e) for s, e in zip(marks, ends) if e is not None]


def mutate(rng: random.Random, data: bytes, fields: list, header_end: int):
    """One mutated copy of ``data`` and a short description."""
    buf = bytearray(data)
    ops = []
    n_ops = 1 if rng.random() < 0.7 else rng.randint(2, 4)
    for _ in range(n_ops):
        op = rng.choices(
            ["u64", "u32", "bitflip", "bytes", "truncate", "truncate_field", "dup_kv", "dup_ti",
             "splice", "insert", "delete"],
            weights=[25, 12, 15, 10, 8, 8, 4, 4, 5, 5, 4])[0]
        if op in ("u64", "u32"):
            kinds = U64_KINDS if op == "u64" else U32_KINDS
            cands = [f for f in fields if f.kind in kinds and f.offset + f.size <= len(buf)]
            if not cands:
                continue
            f = rng.choice(cands)
            if op == "u64":
                old = struct.unpack_from("<Q", buf, f.offset)[0]
                v = _u64_value(rng, old, len(buf), f.offset)
                struct.pack_into("<Q", buf, f.offset, v)
            else:
                old = struct.unpack_from("<I", buf, f.offset)[0]
                v = _u32_value(rng, old)
                struct.pack_into("<I", buf, f.offset, v)
            ops.append(f"{op}:{f.kind}@{f.offset}={v}")
        elif op == "bitflip":
            lim = min(header_end, len(buf)) if rng.random() < 0.85 else len(buf)
            if lim <= 0:
                continue
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(lim)
                buf[i] ^= 1 << rng.randrange(8)
            ops.append("bitflip")
        elif op == "bytes":
            if not buf:
                continue
            i = rng.randrange(min(len(buf), header_end + 16))
            n = rng.randint(1, 8)
            fill = rng.choice([b"\x00", b"\xff", None])
            new = (fill * n) if fill else bytes(rng.getrandbits(8) for _ in range(n))
            buf[i:i + n] = new[:len(buf) - i]
            ops.append(f"bytes@{i}")
        elif op == "truncate":
            n = rng.randrange(len(buf) + 1)
            del buf[n:]
            ops.append(f"truncate={n}")
        elif op == "truncate_field":
            f = rng.choice(fields)
            n = max(0, min(len(buf), f.offset + rng.choice([0, 1, -1, f.size - 1, f.size])))
            del buf[n:]
            ops.append(f"truncate_field={n}")
        elif op in ("dup_kv", "dup_ti"):
            regions = _region(fields, "kv" if op == "dup_kv" else "ti")
            if not regions:
                continue
            s, e = rng.choice(regions)
            if e > len(buf):
                continue
            buf[e:e] = buf[s:e]  # the copy follows the original: duplicate key / tensor name
            cnt = 16 if op == "dup_kv" else 8
            if len(buf) >= cnt + 8 and rng.random() < 0.8:
                struct.pack_into("<Q", buf, cnt, (struct.unpack_from("<Q", buf, cnt)[0] + 1) % 2**64)
            ops.append(f"{op}@{s}")
        elif op == "splice":
            if len(buf) < 2:
                continue
            n = rng.randint(1, 64)
            s = rng.randrange(len(buf))
            d = rng.randrange(len(buf))
            chunk = buf[s:s + n]
            buf[d:d + len(chunk)] = chunk
            ops.append("splice")
        elif op == "insert":
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
            ops.append(f"insert@{i}")
        elif op == "delete":
            if not buf:
                continue
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 16)]
            ops.append(f"delete@{i}")
    return bytes(buf), ",".join(ops) or "none"


# ------------------------------------------------------------------------------------------
# Checking one input
# ------------------------------------------------------------------------------------------

class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang(f"case took longer than {CASE_TIMEOUT_S} s")


def check_file(path) -> tuple:
    """('ok', None) | ('error', message) | ('FAIL', description). Touches everything a parse returns."""
    try:
        f = GGUFFile(path)
    except GGUFError as e:
        msg = str(e)
        if not msg.strip():
            return "FAIL", "GGUFError without a message"
        if "MemoryError" in msg:
            return "FAIL", f"allocation blew up (caught as {msg[-200:]!r})"
        return "error", msg
    except Hang as e:
        return "FAIL", f"hang: {e}"
    except BaseException as e:  # noqa: BLE001 — this is what the fuzz looks for
        return "FAIL", f"{type(e).__name__}: {e}"
    try:  # a file that parses must give usable views within the mapping
        for k, v in f.metadata.items():
            if isinstance(v, np.ndarray) and v.size:
                v[0], v[-1]
        for t in f.tensors.values():
            if t.data.size:
                int(t.data.reshape(-1)[0]) + int(t.data.reshape(-1)[-1])
            assert f.data_offset + t.offset + t.nbytes <= f.size
    except BaseException as e:  # noqa: BLE001
        return "FAIL", f"parsed, but the result is unusable: {type(e).__name__}: {e}"
    finally:
        f.close()
    return "ok", None


def _error_kind(msg: str) -> str:
    """A coarse label for an error message, for the report."""
    for k in ("malformed GGUF (", "bad magic", "unsupported GGUF version", "truncated file", "cannot fit",
              "is absurd", "unknown value type", "unknown array element type", "unknown ggml type",
              "dimensions", "bad dimension", "absurd element count", "block size", "not aligned",
              "runs past the end", "overlap", "duplicate metadata key", "duplicate tensor name",
              "general.alignment", "nested deeper"):
        if k in msg:
            return k
    return "other"


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def address_space_limit(headroom=AS_HEADROOM):
    """Cap this process's address space at its current size + headroom (soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ------------------------------------------------------------------------------------------
# The fuzz worker
# ------------------------------------------------------------------------------------------

def make_bases(with_real=True) -> list:
    bases = [("mini", base_mini()), ("aligned_v2", base_aligned_v2())]
    p = smollm2_path_or_none() if with_real else None
    if p is not None:
        bases.append(("smollm2_mini", base_smollm2_mini(p)))
    out = []
    for name, data in bases:
        fields = walk(data)
        header_end = min([f.offset for f in fields if f.kind == "data"] or [len(data)])
        out.append((name, data, fields, header_end))
    return out


def fuzz(start: int, stop: int, seed: int, tmpdir: str, with_real=True) -> dict:
    bases = make_bases(with_real)
    for name, data, *_ in bases:  # the bases themselves parse
        p = os.path.join(tmpdir, f"base-{name}.gguf")
        Path(p).write_bytes(data)
        status, msg = check_file(p)
        assert status == "ok", (name, status, msg)
    counts = {"cases": 0, "parsed": 0, "gguf_error": 0, "failures": 0}
    kinds: dict = {}
    failures = []
    max_case_s = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    path = os.path.join(tmpdir, "case.gguf")
    with address_space_limit():
        for i in range(start, stop):
            rng = random.Random(seed * 1_000_003 + i)
            name, data, fields, header_end = bases[i % len(bases)]
            mutated, desc = mutate(rng, data, fields, header_end)
            tmp = path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(mutated)
            os.replace(tmp, path)  # a new inode each time: earlier mappings stay valid
            c0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
            try:
                status, msg = check_file(path)
            except Hang as e:
                status, msg = "FAIL", f"hang: {e}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            max_case_s = max(max_case_s, time.perf_counter() - c0)
            counts["cases"] += 1
            if status == "ok":
                counts["parsed"] += 1
            elif status == "error":
                counts["gguf_error"] += 1
                k = _error_kind(msg)
                kinds[k] = kinds.get(k, 0) + 1
                if k in ("malformed GGUF (", "other") and len(failures) < 50:
                    # not a failure, but the safety net or an unlabelled message: worth a look
                    failures.append({"case": i, "seed": seed, "base": name, "ops": desc, "note": msg[-300:]})
            else:
                counts["failures"] += 1
                failures.append({"case": i, "seed": seed, "base": name, "ops": desc, "FAIL": msg[-500:]})
    elapsed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **counts, "error_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "bases": [b[0] for b in bases], "seconds": round(elapsed, 2),
        "max_case_s": round(max_case_s, 4), "peak_rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
        "open_fds": len(os.listdir("/proc/self/fd")), "reports": failures,
    }


def run_fuzz_subprocess(n: int, seed: int, jobs: int = 1, timeout: float = 3600) -> dict:
    """Run ``n`` cases in ``jobs`` worker processes; merge their reports."""
    procs = []
    chunk = -(-n // jobs)
    for j in range(jobs):
        a, b = j * chunk, min(n, (j + 1) * chunk)
        if a >= b:
            continue
        cmd = [sys.executable, str(HERE), "--worker", "--start", str(a), "--stop", str(b), "--seed", str(seed)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"fuzz worker died with status {p.returncode} (crash?):\n{err[-3000:]}")
        results.append(json.loads(out))
    merged = {"cases": 0, "parsed": 0, "gguf_error": 0, "failures": 0, "error_kinds": {}, "reports": [],
              "seconds": 0.0, "max_case_s": 0.0, "peak_rss_growth_mb": 0.0, "open_fds": 0, "jobs": len(results)}
    for r in results:
        for k in ("cases", "parsed", "gguf_error", "failures"):
            merged[k] += r[k]
        for k, v in r["error_kinds"].items():
            merged["error_kinds"][k] = merged["error_kinds"].get(k, 0) + v
        merged["reports"] += r["reports"]
        for k in ("seconds", "max_case_s", "peak_rss_growth_mb", "open_fds"):
            merged[k] = max(merged[k], r[k])
        merged["bases"] = r["bases"]
    return merged


def assert_fuzz_clean(r: dict, n: int):
    fails = [x for x in r["reports"] if "FAIL" in x]
    assert r["failures"] == 0 and not fails, json.dumps(fails[:10], indent=1)
    assert r["cases"] == n
    assert r["parsed"] > 0 and r["gguf_error"] > 0  # the mutator makes both kinds
    assert r["error_kinds"].get("malformed GGUF (", 0) == 0, "safety net reached: " + json.dumps(r["reports"][:5])
    assert r["max_case_s"] < 1.0, r["max_case_s"]
    assert r["peak_rss_growth_mb"] * 2**20 < RSS_GROWTH_LIMIT, r["peak_rss_growth_mb"]
    assert r["open_fds"] < 64, r["open_fds"]


# ------------------------------------------------------------------------------------------
# pytest: the mutation loop
# ------------------------------------------------------------------------------------------

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def test_fuzz_mutations():
    r = run_fuzz_subprocess(NORMAL_N, seed=1, jobs=2, timeout=300)
    print(json.dumps({k: v for k, v in r.items() if k != "reports"}))
    assert_fuzz_clean(r, NORMAL_N)


@pytest.mark.slow
def test_fuzz_mutations_long():
    n = SLOW_N
    t0 = time.perf_counter()
    r = run_fuzz_subprocess(n, seed=int(os.environ.get("TINYINFER_FUZZ_SEED", "7")), jobs=os.cpu_count() or 1,
                            timeout=6 * 3600)
    print(f"\n{n} cases in {time.perf_counter() - t0:.1f} s:",
          json.dumps({k: v for k, v in r.items() if k != "reports"}))
    assert_fuzz_clean(r, n)


def test_harness_catches_what_it_should(monkeypatch, tmp_path):
    """The checker flags other exception types, swallowed MemoryErrors, huge allocations under
    the address-space cap, and hangs."""
    import test_gguf_fuzz as me
    p = tmp_path / "x.gguf"
    p.write_bytes(base_mini())

    def fake(exc=None, alloc=0, sleep=0.0):
        def f(path):
            if alloc:
                np.ones(alloc, dtype=np.uint8)
            if sleep:
                time.sleep(sleep)
            raise exc
        return f
    for exc in (KeyError("k"), IndexError("i"), struct.error("s"), RecursionError("r")):
        monkeypatch.setattr(me, "GGUFFile", fake(exc))
        assert check_file(p)[0] == "FAIL"
    monkeypatch.setattr(me, "GGUFFile", fake(GGUFError("x: malformed GGUF (MemoryError: )")))
    assert check_file(p)[0] == "FAIL"
    monkeypatch.setattr(me, "GGUFFile", fake(GGUFError("")))
    assert check_file(p)[0] == "FAIL"
    monkeypatch.setattr(me, "GGUFFile", fake(GGUFError("fine"), alloc=4 << 30))
    with address_space_limit():
        status, msg = check_file(p)
        assert status == "FAIL" and msg.startswith("MemoryError"), msg
    monkeypatch.setattr(me, "GGUFFile", fake(GGUFError("fine"), sleep=1.0))
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        status, msg = check_file(p)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert status == "FAIL" and "hang" in msg


def test_walker_agrees_with_builder():
    b = GGUFBuilder()
    b.add("k", VT.ARRAY, (VT.ARRAY, [(VT.STRING, ["a"]), (VT.UINT8, [1, 2])])).add("s", VT.STRING, "x")
    b.add_tensor("t", (32, 2), QT.Q8_0)
    data, built = b.build()
    structural = ("strlen", "vtype", "atype", "acount", "n_tensors", "n_kv", "version", "n_dims", "dim",
                  "ggml_type", "toffset", "kv", "ti", "data")
    key = lambda fs: sorted((f.offset, f.kind) for f in fs if f.kind in structural)  # noqa: E731
    assert key(walk(data)) == key(built)


def test_mutator_is_deterministic():
    bases = make_bases(with_real=False)
    _, data, fields, he = bases[0]
    a = [mutate(random.Random(i), data, fields, he) for i in range(50)]
    b = [mutate(random.Random(i), data, fields, he) for i in range(50)]
    assert a == b and len({m for m, _ in a}) > 40


# ------------------------------------------------------------------------------------------
# pytest: targeted cases
# ------------------------------------------------------------------------------------------

def expect_error(tmp_path, data: bytes, match: str, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    with address_space_limit():
        status, msg = check_file(p)
    assert status == "error", (status, msg)
    assert match in msg, msg
    assert str(p) in msg  # names the file
    return msg


def _patch(data: bytes, off: int, fmt: str, v) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, v)
    return bytes(b)


def _field(fields, kind, what=None, nth=0):
    fs = [f for f in fields if f.kind == kind and (what is None or f.what == what)]
    return fs[nth]


@pytest.fixture(scope="module")
def mini():
    data = base_mini()
    return data, walk(data)


def test_zero_length_and_tiny_files(tmp_path):
    expect_error(tmp_path, b"", "bad magic b''")
    expect_error(tmp_path, b"GGU", "bad magic")
    expect_error(tmp_path, b"GGUF", "truncated file")
    expect_error(tmp_path, b"GGUF" + struct.pack("<I", 3) + b"\0" * 15, "truncated file")


@pytest.mark.parametrize("magic", [b"GGML", b"\0\0\0\0", b"FUGG", b"ggjt", b"\x7fELF", b"PK\x03\x04"])
def test_bad_magic(tmp_path, mini, magic):
    data, _ = mini
    expect_error(tmp_path, magic + data[4:], "not a GGUF file")


@pytest.mark.parametrize("version,hint", [(0, ""), (1, ""), (4, ""), (2**32 - 1, ""), (0x03000000, "big-endian")])
def test_unsupported_version(tmp_path, mini, version, hint):
    data, _ = mini
    msg = expect_error(tmp_path, _patch(data, 4, "<I", version), "unsupported GGUF version")
    assert hint in msg


@pytest.mark.parametrize("kind", ["n_tensors", "n_kv"])
@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 2**40, 2**20])
def test_absurd_counts(tmp_path, mini, kind, value):
    data, fields = mini
    expect_error(tmp_path, _patch(data, _field(fields, kind).offset, "<Q", value), "cannot fit")


def test_more_counted_than_present(tmp_path, mini):
    data, fields = mini
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    expect_error(tmp_path, _patch(data, 16, "<Q", n_kv + 1), "")  # the next "key" is a tensor name
    n_t = struct.unpack_from("<Q", data, 8)[0]
    expect_error(tmp_path, _patch(data, 8, "<Q", n_t + 1), "")


@pytest.mark.parametrize("nth", [0, 5, -1])  # first key, a middle one, the last tensor name
@pytest.mark.parametrize("value,match", [(2**64 - 1, "absurd"), (2**40, "absurd"), (2**30 + 1, "absurd"),
                                         (None, "truncated")])
def test_string_length_past_end(tmp_path, mini, nth, value, match):
    data, fields = mini
    f = [x for x in fields if x.kind == "strlen"][nth]
    if value is None:
        value = len(data) - f.offset - 8 + 1  # one byte more than the file has
    msg = expect_error(tmp_path, _patch(data, f.offset, "<Q", value), match)
    assert str(f.offset) in msg or "truncated" in msg


def test_string_in_array_past_end(tmp_path, mini):
    data, fields = mini
    f = [x for x in fields if x.kind == "strlen" and x.what == "tokenizer.ggml.tokens[]"][10]
    for v in (2**64 - 1, len(data), 2**33):
        expect_error(tmp_path, _patch(data, f.offset, "<Q", v), "runs past the end")


@pytest.mark.parametrize("what", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "test.nested"])
@pytest.mark.parametrize("value", [2**64 - 1, 2**62, 2**32, 100_000])
def test_array_count_huge(tmp_path, mini, what, value):
    data, fields = mini
    f = _field(fields, "acount", what)
    expect_error(tmp_path, _patch(data, f.offset, "<Q", value), "cannot fit")


@pytest.mark.parametrize("value", [13, 14, 100, 2**31, 2**32 - 1])
def test_unknown_value_type(tmp_path, mini, value):
    data, fields = mini
    expect_error(tmp_path, _patch(data, _field(fields, "vtype", nth=3).offset, "<I", value), "unknown value type")
    expect_error(tmp_path, _patch(data, _field(fields, "atype", "tokenizer.ggml.scores").offset, "<I", value),
                 "unknown array element type")


@pytest.mark.parametrize("value", [4, 5, 31, 32, 33, 36, 37, 38, 42, 1000, 2**32 - 1])
def test_unknown_ggml_type(tmp_path, mini, value):
    data, fields = mini
    expect_error(tmp_path, _patch(data, _field(fields, "ggml_type", nth=1).offset, "<I", value),
                 "unknown ggml type")


@pytest.mark.parametrize("value", [5, 8, 2**16, 2**32 - 1])
def test_too_many_dims(tmp_path, mini, value):
    data, fields = mini
    expect_error(tmp_path, _patch(data, _field(fields, "n_dims", nth=2).offset, "<I", value), "dimensions")


@pytest.mark.parametrize("value,match", [(0, "bad dimension"), (2**64 - 1, "bad dimension"),
                                         (2**41, "bad dimension"), (2**39, "")])
def test_bad_dims(tmp_path, mini, value, match):
    data, fields = mini
    expect_error(tmp_path, _patch(data, _field(fields, "dim", nth=1).offset, "<Q", value), match)


def test_element_count_overflow(tmp_path):
    b = GGUFBuilder()
    b.tensors.append(("huge", (2**40, 2**40, 2**40), int(QT.F32), b"", 0))
    expect_error(tmp_path, b.build()[0], "absurd element count")


def test_row_not_multiple_of_block(tmp_path):
    b = GGUFBuilder()
    b.tensors.append(("q", (33, 2), int(QT.Q8_0), b"\0" * 72, 0))
    expect_error(tmp_path, b.build()[0], "block size")


def test_data_out_of_bounds(tmp_path, mini):
    data, fields = mini
    f = [x for x in fields if x.kind == "toffset"][-1]
    expect_error(tmp_path, _patch(data, f.offset, "<Q", 2**64 - 32), "runs past the end")
    expect_error(tmp_path, _patch(data, f.offset, "<Q", len(data)), "runs past the end")
    last = [x for x in fields if x.kind == "data"][-1]
    expect_error(tmp_path, data[:last.offset + last.size - 1], "runs past the end")


def test_misaligned_offset(tmp_path, mini):
    data, fields = mini
    f = [x for x in fields if x.kind == "toffset"][1]
    old = struct.unpack_from("<Q", data, f.offset)[0]
    for v in (old + 1, old + 16, old + 31):
        expect_error(tmp_path, _patch(data, f.offset, "<Q", v), "not aligned")


def test_overlapping_tensors(tmp_path, mini):
    data, fields = mini
    offs = [x for x in fields if x.kind == "toffset"]
    # the third tensor placed where the second is
    expect_error(tmp_path, _patch(data, offs[2].offset, "<Q", struct.unpack_from("<Q", data, offs[1].offset)[0]),
                 "overlap")
    # a tensor inside a larger one
    b = GGUFBuilder()
    b.add_tensor("big", (64,), QT.F32, offset=0)
    b.add_tensor("small", (4,), QT.F32, offset=64)
    expect_error(tmp_path, b.build()[0], "overlap")


def test_duplicate_key_and_tensor_name(tmp_path):
    b = GGUFBuilder().add("a", VT.UINT32, 1).add("b", VT.STRING, "x").add("a", VT.UINT8, 2)
    expect_error(tmp_path, b.build()[0], "duplicate metadata key 'a'")
    b = GGUFBuilder()
    b.add_tensor("w", (4,), QT.F32)
    b.add_tensor("w", (4,), QT.F32)
    expect_error(tmp_path, b.build()[0], "duplicate tensor name 'w'")


@pytest.mark.parametrize("vt,value", [(VT.UINT32, 0), (VT.UINT32, 3), (VT.UINT32, 48), (VT.UINT32, 2**32 - 1),
                                      (VT.UINT64, 32), (VT.INT32, 32), (VT.STRING, "32"), (VT.BOOL, True)])
def test_bad_alignment(tmp_path, vt, value):
    b = GGUFBuilder().add("general.alignment", vt, value)
    b.add_tensor("w", (4,), QT.F32)
    expect_error(tmp_path, b.build()[0], "general.alignment")


def test_huge_alignment_truncates(tmp_path):
    b = GGUFBuilder().add("general.alignment", VT.UINT32, 2**31)
    b.tensors.append(("w", (4,), int(QT.F32), b"\0" * 16, 0))
    expect_error(tmp_path, b.build()[0], "truncated file")


def test_nesting_too_deep(tmp_path):
    v = (VT.UINT8, [1])
    for _ in range(9):
        v = (VT.ARRAY, [v])
    expect_error(tmp_path, GGUFBuilder().add("deep", VT.ARRAY, v).build()[0], "nested deeper")


def test_truncation_at_every_field_boundary(tmp_path):
    """Cut each base file at every field's start, start+1 and end-1: a GGUFError unless the cut
    lies in the trailing padding after the last tensor."""
    for name, data, fields, header_end in make_bases(with_real=False):
        last_data_end = max(f.offset + f.size for f in fields if f.kind == "data")
        cuts = sorted({c for f in fields for c in (f.offset, f.offset + 1, f.offset + f.size - 1)
                       if 0 <= c < len(data)} | {len(data) - 1})
        for n in cuts:
            p = tmp_path / f"{name}-{n}.gguf"
            p.write_bytes(data[:n])
            status, msg = check_file(p)
            if n < last_data_end:
                assert status == "error", (name, n, status, msg)
            else:
                assert status in ("ok", "error"), (name, n, status, msg)
            p.unlink()


def _sparse_truncated_copy(header: bytes, size: int, dst: Path):
    """A file of ``size`` bytes whose beginning is the real header and the rest a sparse hole:
    the reader never reads tensor data, so for it this is the real file cut at ``size``."""
    with open(dst, "wb") as f:
        f.write(header[:size])
        f.truncate(size)


def _real_cuts(fields, data_offset, file_size, every=False):
    """Where to cut a real file: every key/value's structural fields (not each string of the
    vocabulary: a sample of those), the first and last tensor infos' fields, the start of
    every tensor info (``every``), and around the data section."""
    header = [f for f in fields if f.offset < data_offset and f.kind not in ("data", "padding")]
    first_ti = next((i for i, f in enumerate(header) if f.kind == "ti"), len(header))
    kv_part, ti_part = header[:first_ti], header[first_ti:]
    elems = [f for f in kv_part if f.what.endswith("[]")]
    cuts = set()
    for f in kv_part:
        if not f.what.endswith("[]"):
            cuts.add(f.offset)
            if every or f.kind == "kv":
                cuts.add(f.offset + 1)
    step = 997 if every else 9973
    cuts |= {f.offset + 1 for f in elems[::step]}
    marks = [i for i, f in enumerate(ti_part) if f.kind == "ti"]
    n_edge = 20 if every else 2
    for j, i in enumerate(marks):
        if every or j < n_edge or j >= len(marks) - n_edge:
            end = marks[j + 1] if j + 1 < len(marks) else len(ti_part)
            take = ti_part[i:end] if (j < n_edge or j >= len(marks) - n_edge) else ti_part[i:i + 1]
            cuts |= {f.offset for f in take} | ({f.offset + 1 for f in take} if every else set())
    datas = [f for f in fields if f.kind == "data"]
    cuts |= {data_offset - 1, data_offset, data_offset + 1, datas[0].offset + datas[0].size - 1, file_size - 1}
    return sorted(c for c in cuts if 0 <= c < file_size)


def _check_real_truncations(tmp_path, path, every):
    src = Path(path)
    size = src.stat().st_size
    f0 = GGUFFile(src)
    with open(src, "rb") as f:
        header = f.read(f0.data_offset)
    fields = _walk_header_only(header, f0)
    last_data_end = max(f0.data_offset + t.offset + t.nbytes for t in f0.tensors.values())
    cuts = _real_cuts(fields, f0.data_offset, size, every)
    for n in cuts:
        p = tmp_path / "cut.gguf"
        _sparse_truncated_copy(header, n, p)
        status, msg = check_file(p)
        assert status == "error" if n < last_data_end else status in ("ok", "error"), (n, status, msg)
        p.unlink()
    return len(cuts)


def _walk_header_only(header: bytes, f: GGUFFile) -> list:
    """walk() needs the data section only for the "data" fields: add them from the reader."""
    fields = walk(header)
    fields = [x for x in fields if x.kind != "data"]
    fields += [Field(f.data_offset + t.offset, t.nbytes, "data", t.name) for t in f.tensors.values()]
    return fields


def test_real_header_truncations(tmp_path, smollm2_path):
    n = _check_real_truncations(tmp_path, smollm2_path, every=False)
    assert n > 100


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_header_truncations_every_field(tmp_path, request, model):
    path = request.getfixturevalue(f"{model}_path")
    n = _check_real_truncations(tmp_path, path, every=True)
    print(f"{model}: {n} truncations")


def test_real_header_u64_fields(tmp_path, smollm2_path):
    """Hostile values in the real header's count/length/dim/offset fields (a sample)."""
    src = Path(smollm2_path)
    f0 = GGUFFile(src)
    with open(src, "rb") as fh:
        header = fh.read(f0.data_offset)
    fields = _walk_header_only(header, f0)
    rng = random.Random(5)
    cands = [f for f in fields if f.kind in U64_KINDS + U32_KINDS]
    first = [f for f in cands if f.offset < 2000]  # the early fields make cheap cases
    sample = first + rng.sample(cands, 30)
    size = src.stat().st_size
    p = tmp_path / "m.gguf"
    for f in sample:
        for v in ([2**64 - 1, 2**63, size] if f.kind in U64_KINDS else [13, 2**32 - 1]):
            b = bytearray(header)
            struct.pack_into("<Q" if f.kind in U64_KINDS else "<I", b, f.offset, v)
            _sparse_truncated_copy(bytes(b), size, p)
            status, msg = check_file(p)
            assert status in ("ok", "error"), (f, v, status, msg)
            p.unlink()


# ------------------------------------------------------------------------------------------
# hypothesis
# ------------------------------------------------------------------------------------------

_BASES = make_bases(with_real=False)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_patches(tmp_path_factory, data):
    name, base, fields, header_end = data.draw(st.sampled_from(_BASES), label="base")
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4), label="n_patches")):
        if data.draw(st.booleans(), label="structural"):
            f = data.draw(st.sampled_from([x for x in fields if x.kind in U64_KINDS + U32_KINDS]), label="field")
            if f.kind in U64_KINDS:
                struct.pack_into("<Q", buf, f.offset, data.draw(st.integers(0, 2**64 - 1), label="u64"))
            else:
                struct.pack_into("<I", buf, f.offset, data.draw(st.integers(0, 2**32 - 1), label="u32"))
        else:
            pos = data.draw(st.integers(0, len(buf) - 1), label="pos")
            patch = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
            buf[pos:pos + len(patch)] = patch
    if data.draw(st.booleans(), label="truncate"):
        del buf[data.draw(st.integers(0, len(buf)), label="cut"):]
    p = tmp_path_factory.mktemp("hp") / "h.gguf"
    p.write_bytes(bytes(buf))
    with address_space_limit():
        status, msg = check_file(p)
    assert status in ("ok", "error"), msg
    assert status == "ok" or "malformed GGUF (" not in msg, msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([2, 3]), n_tensors=st.integers(0, 2**64 - 1) | st.integers(0, 4),
       n_kv=st.integers(0, 2**64 - 1) | st.integers(0, 4), tail=st.binary(max_size=300))
def test_hypothesis_random_body(tmp_path_factory, version, n_tensors, n_kv, tail):
    p = tmp_path_factory.mktemp("hb") / "b.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + tail)
    with address_space_limit():
        status, msg = check_file(p)
    assert status in ("ok", "error"), msg


# ------------------------------------------------------------------------------------------
# command line: the long run, and the worker
# ------------------------------------------------------------------------------------------

def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fuzz tinyinfer.gguf")
    ap.add_argument("--n", type=int, default=SLOW_N)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=0)
    ap.add_argument("--case", type=int, help="replay one case: write it to ./fuzz-case.gguf and check it")
    args = ap.parse_args(argv)
    if args.case is not None:
        bases = make_bases()
        name, data, fields, he = bases[args.case % len(bases)]
        mutated, desc = mutate(random.Random(args.seed * 1_000_003 + args.case), data, fields, he)
        Path("fuzz-case.gguf").write_bytes(mutated)
        print(name, desc, check_file("fuzz-case.gguf"))
        return 0
    if args.worker:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(fuzz(args.start, args.stop, args.seed, d)))
        return 0
    t0 = time.perf_counter()
    r = run_fuzz_subprocess(args.n, args.seed, args.jobs, timeout=24 * 3600)
    r["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(r, indent=1))
    try:
        assert_fuzz_clean(r, args.n)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
