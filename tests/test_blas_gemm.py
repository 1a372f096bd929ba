"""kernels/blas.py (an encoder's packed-batch matmul through numpy's BLAS) against the quantized kernels
of kernels/matmul.py: the same activation rounding (llama.cpp's vec_dot_type), so the same products up
to the order of the float sums (and the fp16 sum term of q8_1), for every runnable weight type, whole
and in row tiles."""

import numpy as np
import pytest

from tinyinfer.kernels import blas, quants
from tinyinfer.kernels import matmul as mm

TYPES = [e.name for e in quants.TYPES.values() if e.runnable]


@pytest.mark.parametrize("name", TYPES)
def test_gemm_equals_quantized_kernels(name, monkeypatch):
    t = next(t for t, e in quants.TYPES.items() if e.name == name)
    rng = np.random.default_rng(21)
    k, rows, n = 512, 40, 33
    raw = quants.quantize(rng.standard_normal((rows, k)).astype(np.float32), t)
    pw = mm.prepare(raw, t, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    want = mm.matmul(pw, x)
    # Q4_1 / Q5_1: llama.cpp's q8_1 keeps d * sum(q) of the activations as fp16 for the weights' min term,
    # BLAS has the exact sum (a relative difference of ~1e-3 on that term)
    scale = np.abs(want).max() * (50 if pw.info.act == "q8_1" else 1)
    got = blas.gemm(pw, x)
    assert np.abs(got - want).max() <= 2e-5 * scale, name
    monkeypatch.setattr(blas, "TILE_FLOATS", 7 * k)           # 7 rows at a time: tiles and a short last one
    out = np.full((n, rows + 8), np.nan, np.float32)
    got = blas.gemm(pw, x, out[:, 4:rows + 4])                # into columns of a wider array
    assert np.abs(got - want).max() <= 2e-5 * scale, name
    assert np.isnan(out[:, :4]).all() and np.isnan(out[:, rows + 4:]).all()
    if name == "Q8_0":                                         # not float activations: llama.cpp's rounding
        exact = x @ quants.dequantize(raw, t, k).T
        assert np.abs(exact - want).max() > 100 * np.abs(got - want).max()


@pytest.mark.parametrize("typ,uses_blas", [(0, True), (1, True), (8, False)])      # F32, F16, Q8_0
def test_encoder_linear_switches_at_min_rows(typ, uses_blas, monkeypatch):
    """An encoder's float weight takes BLAS from blas.MIN_ROWS rows on, the kernels of matmul.py below;
    a quantized weight always takes its int8 GEMM."""
    from tinyinfer.models import encoder

    calls = []
    monkeypatch.setattr(blas, "gemm", lambda pw, x, out=None: calls.append(x.shape[0]) or mm.matmul(pw, x))

    class T:        # the TensorInfo fields Linear reads
        name, shape, ggml_type = "w", (64, 16), typ
        data = quants.quantize(np.ones((16, 64), np.float32), typ)
        n_elements, nbytes = 16 * 64, data.nbytes
    lin = encoder.Linear(T())
    for n in (1, blas.MIN_ROWS - 1, blas.MIN_ROWS, 100):
        assert np.allclose(lin(np.ones((n, 64), np.float32)), 64, rtol=1e-3)   # fp16 scales
    assert calls == ([blas.MIN_ROWS, 100] if uses_blas else [])
