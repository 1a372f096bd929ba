"""x @ W.T for many activation rows through numpy's BLAS: the matrix products of an encoder's packed
batch (tinyinfer/models/encoder.py), where hundreds of rows meet each weight matrix.

    y = gemm(pw, x)          # pw: a PreparedWeight (kernels/matmul.py), x: float32 (n, k)

An F32 weight is multiplied in place (its bytes viewed as float32); any other type is dequantized to
float32 (kernels/quants.py) a block of rows at a time and multiplied block by block, so the float32
copy never exceeds ``TILE_FLOATS``. The activations are first rounded as the quantized kernels (and
llama.cpp's vec_dot_type) round them: Q8_0 blocks for Q4_0..Q8_0, Q8_K for the K-quants, F16 / BF16 for
F16 / BF16 weights. A product of a dequantized weight and a dequantized activation is exact in
float32, so the result is the quantized kernels' up to the order of the float sums (and, for Q4_1 /
Q5_1, the fp16 rounding of q8_1's d * sum term, which BLAS takes exact). BLAS runs on the
engine's thread count (``-t``), as the attention's products do.

This is not the decode path. Where it pays (:func:`preferred`), measured on one core of an AVX-512
Xeon (all-MiniLM-L6-v2's matrices, benchmarks/RESULTS.md "Embeddings"): float weights (F32 / F16 /
BF16) from :data:`MIN_ROWS` rows on (below, the F32 kernels of kernels/matmul.py are as fast: ~95
GFLOP/s at 32 rows against BLAS's ~75; at 256-480 rows BLAS reaches 105-145 where they fall to 30-50).
Quantized weights stay on their int8 GEMM, which beat dequantize-then-BLAS at every batch size there
(Q8_0: ~150 against 45-130 GFLOP/s); :func:`gemm` runs them too (tests, other machines).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import matmul as mm
from . import quants
from .ops import limit_blas_threads

MIN_ROWS = 64               # activation rows from which an encoder's float matmuls take this path
FLOAT_TYPES = (0, 1, 30)    # F32, F16, BF16
TILE_FLOATS = 1 << 21       # float32 weights dequantized at once (8 MiB)
_F32 = 0                    # GGML_TYPE_F32


def preferred(pw) -> bool:
    """Whether an encoder multiplies this weight through :func:`gemm` once it has :data:`MIN_ROWS` rows."""
    return pw.ggml_type in FLOAT_TYPES


def gemm(pw, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T: ``pw`` from :func:`tinyinfer.kernels.matmul.prepare`, x float32 C-contiguous (n, k)
    -> float32 (n, rows) (into ``out``, rows contiguous, when given)."""
    limit_blas_threads()
    n, k = x.shape
    rows = pw.rows
    if out is None:
        out = np.empty((n, rows), np.float32)
    w = pw.w                                   # (rows, row bytes) as in the file (or the fused copy)
    x = rounded(x, pw.info.act)
    if pw.ggml_type == _F32:
        np.matmul(x, w.view(np.float32).reshape(rows, k).T, out=out)
        return out
    step = max(1, min(rows, TILE_FLOATS // k))
    buf = np.empty((step, k), np.float32)
    threads = nb.get_num_threads()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wt = quants.dequantize(w[r0:r1], pw.ggml_type, k, out=buf[:r1 - r0], threads=threads)
        np.matmul(x, wt.T, out=out[:, r0:r1])
    return out


def rounded(x: np.ndarray, act: str) -> np.ndarray:
    """x (n, k) float32 as a weight type's activation format holds it (``act``: f32, f16, bf16, q8_0,
    q8_1, q8_K), back in float32."""
    if act == "f32":
        return x
    xq, xd, _, _ = mm.quantize_activations(x, act)
    if act in ("f16", "bf16"):
        return xq
    n, k = x.shape
    block = 256 if act == "q8_K" else 32
    return (xq.reshape(n, k // block, block) * xd[:, :, None]).reshape(n, k)
