"""A stand-in for an original (unquantized) SmolLM2 F16, to ask how well a Q4_0 draft made from a real F16
agrees with it (benchmarks/RESULTS.md, "Speculative decoding").

    python benchmarks/make_dithered_f16.py OUT.gguf [--seed 0]

The project's SmolLM2 F16 (``ensure_requantized("F16")``) is the Q4_1 download decoded: every weight that
was Q4_1 sits on its block's 16-level grid, so a Q4_0 made from it is a requantization of grid values.
Here each of those weights is moved by uniform noise within its block's step (+-d/2 with
d = (max - min) / 15 over its block of 32): a weight the Q4_1 quantization could have come from. The
other tensors (norms, the Q8_0 token embedding) are copied as they are. Then quantize OUT to Q4_0 with
``python -m tinyinfer quantize`` and compare with ``bench_speculative.py --acceptance DRAFT --target OUT``.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np


def main(argv=None):
    from tinyinfer.fetch import fetch
    from tinyinfer.gguf import open_gguf
    from tinyinfer.tools.quantize import ensure_requantized
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    src = ensure_requantized("F16")
    with open_gguf(fetch("smollm2", quiet=True)) as q:
        names = [n for n, t in q.tensors.items() if t.type_name == "Q4_1"]
    shutil.copyfile(src, a.out)
    rng = np.random.default_rng(a.seed)
    out = np.memmap(a.out, np.uint8, mode="r+")
    with open_gguf(src) as g:
        base = np.frombuffer(g._mm, np.uint8).__array_interface__["data"][0]
        for n in names:
            t = g.tensors[n]
            if t.type_name != "F16":
                raise SystemExit(f"{n}: {t.type_name} in {src}, expected F16")
            raw = np.frombuffer(t.data, np.uint8)
            off = raw.__array_interface__["data"][0] - base
            w = np.frombuffer(t.data, np.float16).astype(np.float32).reshape(-1, 32)
            d = (w.max(1, keepdims=True) - w.min(1, keepdims=True)) / 15
            w += rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) * d
            out[off:off + raw.size] = np.frombuffer(w.astype(np.float16).tobytes(), np.uint8)
    out.flush()
    print(f"{a.out}: {len(names)} tensors dithered")


if __name__ == "__main__":
    main()
