"""Quantized matmul kernels (tinyinfer.kernels.matmul) against numpy references.

For every supported weight type:
* against a float64 numpy reference that quantizes the activations the way
  ggml does (Q8_0 / Q8_1 / f16 / bf16) and sums the same integer products:
  must agree to ~1e-5 relative (only float summation order differs);
* against x @ dequantize(W).T in float: within the activation quantization noise;
* n = 1 (token generation), 7 and 64 (prompt processing), row counts that are
  not multiples of the tile sizes, with and without the repacked layout.
The gguf package's quantize/dequantize are the oracle for the block formats.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

from tinyinfer.kernels import matmul as mm  # noqa: E402
from tinyinfer.kernels import quants  # noqa: E402

from tinyinfer.kernels import arm  # noqa: E402
from tinyinfer.ggml_types import GGMLType as GT  # noqa: E402

# The type lists come from the registry (kernels/quants.py TYPES): a type added there is in ALL and gets
# every kernel test below (a kind the references here do not know fails, it is not skipped).
_RUN = [e for e in quants.TYPES.values() if e.runnable]
FLOAT = [e.name for e in _RUN if not e.is_quantized]
KQUANT = [e.name for e in _RUN if e.vec_dot_type == GT.Q8_K]                       # Q8_K activations
LUT = [e.name for e in _RUN if e.is_quantized and e.name.startswith("IQ") and e.name not in KQUANT]
QUANT = [e.name for e in _RUN if e.is_quantized and e.name not in KQUANT + LUT]   # 32-blocks, Q8_0/Q8_1
ALL = [e.name for e in _RUN]
AFFINE = [n for n in QUANT if "m" in quants.type_info(n).layout]                  # Q8_1 activations (min m)
ARM_TYPES = list(arm.LAYOUTS)


# ------------------------------------------------------------ numpy references
def f16r(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def bf16r(x):
    """float32 -> bfloat16 -> float32, round to nearest even (ggml_compute_fp32_to_bf16)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def ref_quantize_q8(x):
    """ggml's x86/NEON quantize_row_q8_0/q8_1: per block of 32, in float32.

    Returns q (n, nb, 32) int, d (n, nb) fp16-rounded, s (n, nb) = fp16(d * sum(q)).
    """
    n, k = x.shape
    xb = x.reshape(n, k // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        iv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * iv[..., None]).astype(np.int64)
    s = f16r(d * q.sum(-1).astype(np.float32))
    return q, f16r(d), s


def ref_quantize_q8_K(x):
    """ggml quantize_row_q8_K_ref: per 256, iscale = -127/(the x of largest |x|), q = min(127, rint(iscale*x))."""
    n, k = x.shape
    xb = x.reshape(n, k // 256, 256).astype(np.float32)
    mx = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (np.float32(-127) / mx).astype(np.float32)
        q = np.minimum(127, np.rint(iscale[..., None] * xb)).astype(np.int64)
        d = (np.float32(1) / iscale).astype(np.float32)
    q[mx == 0] = 0
    d[mx == 0] = 0
    return q, d


def kscale(name):
    """(offset, count) of the fp16 super-block scale(s) d (and dmin) of a K-quant block, from the registry."""
    lay = quants.type_info(name).layout
    return lay["d"], 2 if "dmin" in lay else 1


KSCALE = {n: kscale(n) for n in KQUANT}   # sane scales instead of random bytes


def random_kquant(name, rows, k, rng):
    """Random K-quant bytes with sane fp16 super-block scales (random data for every other field)."""
    bs = GGML_QUANT_SIZES[T[name]][1]
    raw = rng.integers(0, 256, (rows, k // 256 * bs), dtype=np.uint8)
    blk = raw.reshape(rows, k // 256, bs)
    o, nsc = KSCALE[name]
    sc = rng.uniform(0.001, 0.01, (rows, k // 256, nsc)).astype(np.float16)
    blk[..., o:o + 2 * nsc] = sc.view(np.uint8).reshape(rows, k // 256, 2 * nsc)
    return raw


def decode_blocks(raw, name, k):
    """Raw bytes (rows, row_bytes) -> (q (rows, nb, 32) int, d, m) from the documented ggml layouts."""
    rows = raw.shape[0]
    e = quants.type_info(name)
    lay = e.layout                       # byte offsets of the block's fields, from the registry
    blk = raw.reshape(rows, k // 32, e.type_size)
    d = blk[..., lay["d"]:lay["d"] + 2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = np.zeros_like(d)
    if "m" in lay:
        m = blk[..., lay["m"]:lay["m"] + 2].copy().view(np.float16)[..., 0].astype(np.float64)
    o = lay["qs"]
    if e.type_size - o == 32:            # one int8 per element (Q8_0)
        return blk[..., o:].view(np.int8).astype(np.int64), d, m
    qh = None
    if "qh" in lay:
        qh = blk[..., lay["qh"]:lay["qh"] + 4].copy().view(np.uint32)[..., 0].astype(np.int64)
    qs = blk[..., o:o + 16].astype(np.int64)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    if qh is not None:
        bits = (qh[..., None] >> np.arange(32)) & 1
        q = q | (bits << 4)
    if "m" not in lay:                   # symmetric: q - 2^(bits-1)
        q = q - (16 if qh is not None else 8)
    return q, d, m


def reference(raw, name, k, x):
    """float64 result of llama.cpp's dot products for weight bytes ``raw`` and activations x."""
    if name in KQUANT:
        # d_w*sc*q - dmin*m is what gguf dequantizes to; d_x*q_x is exact in float64
        wd = gguf.quants.dequantize(raw, T[name]).reshape(raw.shape[0], k).astype(np.float64)
        q, d = ref_quantize_q8_K(x)
        return (q * d[..., None].astype(np.float64)).reshape(x.shape) @ wd.T
    if name in FLOAT:
        wd = gguf.quants.dequantize(raw, T[name]).reshape(raw.shape[0], k).astype(np.float64)
        xr = {"F16": f16r, "BF16": bf16r, "F32": lambda v: v}[name](x).astype(np.float64)
        return xr @ wd.T
    if name in LUT:
        # d_w * table value: what gguf dequantizes to; the integer dot is exact in float64
        wd = gguf.quants.dequantize(raw, T[name]).reshape(raw.shape[0], k // 32, 32).astype(np.float64)
        qx, dx, _ = ref_quantize_q8(x)
        return np.einsum("rbj,nbj->nr", wd, qx * dx[..., None].astype(np.float64))
    qw, dw, mw = decode_blocks(raw, name, k)
    qx, dx, sx = ref_quantize_q8(x)
    sumi = np.einsum("rbj,nbj->nrb", qw, qx).astype(np.float64)
    y = (sumi * dw[None] * dx[:, None, :].astype(np.float64)).sum(-1)
    if name in AFFINE:
        y += (mw[None] * sx[:, None, :].astype(np.float64)).sum(-1)
    return y


def make_weight(name, rows, k, rng):
    w = rng.standard_normal((rows, k)).astype(np.float32)
    if name == "F32":
        raw = w.view(np.uint8)
    elif name == "F16":
        raw = w.astype(np.float16).view(np.uint8)
    elif name in KQUANT:
        raw = random_kquant(name, rows, k, rng)
    elif name in LUT:
        raw = quants.quantize(w, T[name])
    else:
        raw = gguf.quants.quantize(w, T[name])
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, T[name]).reshape(rows, k).astype(np.float64)


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", QUANT)
def test_block_decoder_matches_gguf(name):
    """The test's own layout decoder agrees with the gguf package (so the reference is sound)."""
    rng = np.random.default_rng(1)
    raw, wd = make_weight(name, 5, 128, rng)
    q, d, m = decode_blocks(raw, name, 128)
    np.testing.assert_allclose((q * d[..., None] + m[..., None]).reshape(5, 128), wd, rtol=1e-6, atol=1e-6)


def test_activation_quantization_matches_ggml():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 256)).astype(np.float32) * 3
    x[0, :32] = 0                                   # all-zero block: d = 0, q = 0
    x[1, :32] = np.arange(32) - 15.5                # ties: x * 127/amax lands on .5 steps
    x[1, 31] = 127 / 8
    x[2, 32:64] = np.float32(1e-30)                 # tiny values
    q, d, s = ref_quantize_q8(x)
    xq, xd, xs, xsum = mm.quantize_activations(x, "q8_1")
    assert xq.dtype == np.int8
    np.testing.assert_array_equal(xq.reshape(q.shape), q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xs, s)
    np.testing.assert_array_equal(xsum, q.sum(-1))
    xq16, xd0, _, xc = mm.quantize_activations(x, "q8_0", act16=True, sum_mul=-8)
    assert xq16.dtype == np.int16
    np.testing.assert_array_equal(xq16.reshape(q.shape), q)
    np.testing.assert_array_equal(xd0, d)
    np.testing.assert_array_equal(xc, -8 * q.sum(-1))
    qk, dk = ref_quantize_q8_K(x)
    xq, xd, _, xb = mm.quantize_activations(x, "q8_K")
    np.testing.assert_array_equal(xq.reshape(qk.shape), qk)
    np.testing.assert_array_equal(xd, dk)
    np.testing.assert_array_equal(xb, qk.reshape(5, -1, 32).sum(-1))
    xr, *_ = mm.quantize_activations(x, "f16")
    np.testing.assert_array_equal(xr, f16r(x))
    xr, *_ = mm.quantize_activations(x, "bf16")
    np.testing.assert_array_equal(xr, bf16r(x))


SHAPES = [(37, 256, 1), (53, 512, 7), (35, 96, 64), (16, 64, 3), (7, 160, 5)]
KSHAPES = [(37, 512, 1), (50, 256, 7), (21, 768, 64), (3, 256, 5)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("repack", [True, False])
def test_matmul_matches_reference(name, repack):
    if repack and mm._TYPES[int(T[name])].repacked is None:
        pytest.skip("no repacked layout for this type (covered by repack=False)")
    rng = np.random.default_rng(sum(map(ord, name)))
    for rows, k, n in (KSHAPES if name in KQUANT else SHAPES):
        if name in FLOAT:
            k += 3                                  # float types: k need not be a multiple of 32
        raw, wd = make_weight(name, rows, k, rng)
        x = rng.standard_normal((n, k)).astype(np.float32)
        pw = mm.prepare(raw, int(T[name]), k, repack=repack)
        y = mm.matmul(pw, x)
        assert y.shape == (n, rows) and y.dtype == np.float32
        ref = reference(raw, name, k, x)
        assert rel(y, ref) < 2e-6, (name, rows, k, n, rel(y, ref))
        # and against the plain float product: activation quantization noise only
        tol = {"F32": 1e-6, "F16": 2e-3, "BF16": 1e-2}.get(name, 3e-2)
        if name in KQUANT:
            tol = 5e-2                              # random bytes: heavier-tailed weights
        assert rel(y, x.astype(np.float64) @ wd.T) < tol, (name, rows, k, n)
        # out= is filled in place, a 1-D x is one row; one row alone goes through the
        # n == 1 kernels, whose float sums may be ordered differently: ~1 ulp
        out = np.full((n, rows), np.nan, np.float32)
        assert mm.matmul(pw, x, out) is out
        np.testing.assert_array_equal(out, y)
        np.testing.assert_allclose(mm.matmul(pw, x[0])[0], y[0], rtol=2e-6, atol=2e-6 * np.abs(y[0]).max())


def test_repacked_equals_native():
    """The row-interleaved kernels and the native ones see the same numbers (up to summation order)."""
    rng = np.random.default_rng(5)
    for name in [n for n in ALL if quants.type_info(n).repacked is not None]:
        k = 512 if name in KQUANT else 320
        raw, _ = make_weight(name, 50, k, rng)
        for n in (1, 9):
            x = rng.standard_normal((n, k)).astype(np.float32)
            a = mm.matmul(mm.prepare(raw, int(T[name]), k, repack=True), x)
            b = mm.matmul(mm.prepare(raw, int(T[name]), k, repack=False), x)
            assert mm.prepare(raw, int(T[name]), k, repack=True).packed.shape[0] == 3
            assert rel(a, b) < 1e-6, (name, n, rel(a, b))


@pytest.mark.parametrize("name", FLOAT)
def test_float_fma_tiles_equal_native_tiles(name):
    """Float weights: the fused multiply-add tiles (the default, KernelConfig.float_fma) and the native
    tiles (float_fma=False) agree with the reference up to summation order, for the row counts of a
    GEMV, speculative decoding's checks (2-9 rows: FF_NR x FF_NC tiles, the n % FF_NC left over, the
    rows % FF_NR in 1-row tiles) and a prompt, and for k with a tail (k % 32 != 0); each fma row equals
    that row alone (one order for every n)."""
    rng = np.random.default_rng(24)
    for rows, k in ((37, 576), (20, 99)):
        raw, _ = make_weight(name, rows, k, rng)
        x = rng.standard_normal((40, k)).astype(np.float32)
        fma = mm.prepare(raw, int(T[name]), k)
        nat = mm.prepare(raw, int(T[name]), k, config=mm.KernelConfig(float_fma=False))
        alone = np.vstack([mm.matmul(fma, x[i:i + 1]) for i in range(40)])
        for n in (1, 2, 3, 6, 7, 8, 9, 12, 13, 16, 17, 40):
            a, b = mm.matmul(fma, x[:n]), mm.matmul(nat, x[:n])
            assert rel(a, reference(raw, name, k, x[:n])) < 2e-6, (name, rows, k, n)
            assert rel(a, b) < 2e-6, (name, rows, k, n)
            np.testing.assert_array_equal(a, alone[:n], err_msg=f"{name} {rows}x{k} n={n}")


@pytest.mark.parametrize("tile", [(2, 4), (1, 8), (4, 3)])
def test_float_fma_other_targets_tiles(tile, monkeypatch):
    """The float FMA driver with another target's tile shape (FF_NR x FF_NC: NEON's 2 x 4, AVX2's 1 x 8,
    a 4 x 3) gives the host's results bit for bit: the per-output order is the tile shape's invariant."""
    rng = np.random.default_rng(7)
    rows, k = 23, 99
    raw, _ = make_weight("F16", rows, k, rng)
    x = rng.standard_normal((11, k)).astype(np.float32)
    pw = mm.prepare(raw, int(T.F16), k)
    want = mm.matmul(pw, x)
    monkeypatch.setattr(mm, "FF_NR", tile[0])
    monkeypatch.setattr(mm, "FF_NC", tile[1])
    drv = mm._make_ffma(pw.info, False, pw.config)
    for n in (2, 5, 11):
        out = np.zeros((n, rows), np.float32)
        drv(pw.w, x[:n], out)
        np.testing.assert_array_equal(out, want[:n], err_msg=f"{tile} n={n}")


def test_config_passed_in(smollm2_path):
    """A KernelConfig reaches prepare() explicitly, through using_config (innermost wins, restored after),
    and through Llama(..., kernel_config=...) (an Engine built inside using_config) to every weight a model loads,
    experts prepared later included; DEFAULT_CONFIG is untouched."""
    from tinyinfer.engine import Engine
    rng = np.random.default_rng(3)
    raw, _ = make_weight("Q4_0", 32, 64, rng)
    a, b = mm.KernelConfig(repack=False), mm.KernelConfig(parallel_min_bytes=0)
    assert mm.prepare(raw, int(T.Q4_0), 64, config=a).config is a
    with mm.using_config(a):
        assert mm.prepare(raw, int(T.Q4_0), 64).packed is None
        with mm.using_config(b):
            assert mm.prepare(raw, int(T.Q4_0), 64).config is b
        assert mm.current_config() is a
        with mm.using_config(None):
            assert mm.current_config() is a
    assert mm.current_config() is mm.DEFAULT_CONFIG
    with pytest.raises(TypeError, match="kernel_config"):
        with mm.using_config({"repack": False}):
            pass
    with mm.using_config(a):
        eng = Engine(smollm2_path, n_ctx=64)
    assert eng.model.output.w.config is a
    from tinyinfer import Llama
    assert Llama(str(smollm2_path), n_ctx=64, verbose=False, kernel_config=b)._engine.model.output.w.config is b
    assert mm.current_config() is mm.DEFAULT_CONFIG


def test_parallel_path(monkeypatch):
    """Rows split across threads (prange) give the serial result."""
    import numba
    rng = np.random.default_rng(6)
    raw, _ = make_weight("Q4_0", 70, 256, rng)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    pw = mm.prepare(raw, int(T.Q4_0), 256, config=mm.KernelConfig(parallel_min_bytes=0))
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = mm.matmul(pw, x)
        a1 = mm.matmul(pw, x[:1])
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        b = mm.matmul(pw, x)
        b1 = mm.matmul(pw, x[:1])
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a1, b1)


BI_ROWS = (36, 37)     # 36: the aarch64 4-row groups; 37: tails of every tiling


def _batch_variant(name):
    """Whether the default config on this machine still sums a row's blocks in another float order in
    the GEMV than in the GEMM, for one of BI_ROWS (issue 20: batch invariance). Today: the native
    tiles (gemv 1x1 unroll 2 vs gemm 4x4 unroll 1), and the x86 K-quant kgemv kernel (n == 1) vs the
    tile kernels (n > 1) where a weight has no x16 copy (or gemv_x16 is off). The x16 groups, legacy and
    K (n == 1 runs them since gemv_x16), and the 4-row groups (aarch64) agree."""
    e = quants.type_info(name)
    cfg = mm.DEFAULT_CONFIG
    info = mm._TYPES[int(e.ggml_type)]
    for rows in BI_ROWS:
        if cfg.arm and name in arm.LAYOUTS and rows % arm.ROWS == 0:
            continue                     # aarch64 4-row groups: one kernel for every n
        if cfg.repack and e.repacked is not None and not (e.repacked.kquant and cfg.kgemv_on_rows(info)):
            continue                     # x16 groups, their tail rows: 1-row tiles of one order
        if e.vec_dot_type == GT.Q8_K:
            if cfg.kgemv and e.simd.has_gemv:
                return True              # kgemv for n == 1
            continue                     # ktile rows of one order for every n
        if not e.is_quantized and cfg.float_fma:
            continue                     # float FMA tiles: one order for every n
        v, m = cfg.tiling(info, "gemv"), cfg.tiling(info, "gemm")
        if (v.unroll, v.act16, v.wide) != (m.unroll, m.act16, m.wide):
            return True                  # native tiles: GEMV with other accumulators (unroll 2)
    return False


@pytest.mark.parametrize("name,invariant", [(n, True) for n in ALL] + [
    pytest.param(n, False, marks=pytest.mark.xfail(
        strict=True, reason="default config: GEMV and GEMM sum in different float orders")) if _batch_variant(n)
    else (n, False) for n in ALL])
def test_batch_invariance(name, invariant):
    """One weight row x one activation row gives bit-identical float32 results through the GEMV, a GEMM
    of 1, 2, 3, 4, 6, 7 and 64 activation rows, on 1 or 2 threads, for 36 and 37 weight rows, with
    KernelConfig(batch_invariant=True) for every type; with the default config for the types whose
    default kernels already agree (strict xfail for the others: a fix shows)."""
    import numba
    from dataclasses import replace
    base = replace(mm.DEFAULT_CONFIG, batch_invariant=invariant)
    rng = np.random.default_rng(21)
    k = 512
    x = rng.standard_normal((64, k)).astype(np.float32)
    old = numba.get_num_threads()
    try:
        for rows, threads, cfg in [(rows, *tc) for rows in BI_ROWS
                                   for tc in ((1, base), (2, replace(base, parallel_min_bytes=0)))]:
            raw, _ = make_weight(name, rows, k, np.random.default_rng(rows))
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            pw = mm.prepare(raw, int(T[name]), k, config=cfg)
            gemv = np.stack([mm.matmul(pw, x[i:i + 1])[0] for i in range(64)])
            if threads == 1:
                ref = gemv
            np.testing.assert_array_equal(gemv, ref, err_msg=f"{name} {rows} rows: GEMV on {threads} threads")
            for n in (1, 2, 3, 4, 6, 7, 64):
                np.testing.assert_array_equal(mm.matmul(pw, x[:n]), ref[:n],
                                              err_msg=f"{name} {rows} rows: GEMM n={n} on {threads} threads")
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("name", [n for n in ALL if quants.type_info(n).repacked is not None
                                  and not quants.type_info(n).repacked.kquant])
def test_packed_quads_give_pairs_results(name):
    """The x16 legacy groups through u8 x s8 quads (KernelConfig.packed_quads, x86 AVX-512 VNNI) give the
    int16 pairs kernel's floats exactly, for every n of a decode pass and a prompt, with and without
    software prefetch, extreme activations included; elsewhere both configs run the pairs kernel."""
    from dataclasses import replace
    rng = np.random.default_rng(26)
    k = 512
    x = rng.standard_normal((40, k)).astype(np.float32)
    x[5] *= 1000.0
    x[6, ::7] = 0.0
    for rows in (48, 37):
        raw, _ = make_weight(name, rows, k, np.random.default_rng(rows))
        pairs = replace(mm.DEFAULT_CONFIG, packed_quads=False, prefetch_packed=0)
        ref = mm.matmul(mm.prepare(raw, int(T[name]), k, config=pairs), x)
        for pf in (0, 2048):
            quads = replace(mm.DEFAULT_CONFIG, packed_quads=True, prefetch_packed=pf)
            pw = mm.prepare(raw, int(T[name]), k, config=quads)
            for n in (1, 2, 3, 4, 5, 8, 40):
                np.testing.assert_array_equal(mm.matmul(pw, x[:n]), ref[:n], err_msg=f"{name} {rows} n={n} pf={pf}")


@pytest.mark.parametrize("name", ALL)
def test_gemm_chunks_give_one_calls_results(name):
    """A GEMM of more activation rows than KernelConfig.gemm_chunk_bytes holds runs as several driver calls
    (the activations stay in L2): bit-identical to one call, with the default config (chunks are whole
    multiples of every tile's activation rows), for 251 rows in chunks of 120 and 36 / 37 weight rows."""
    from dataclasses import replace
    rng = np.random.default_rng(23)
    k = 256
    x = rng.standard_normal((251, k)).astype(np.float32)
    for rows in BI_ROWS:
        raw, _ = make_weight(name, rows, k, np.random.default_rng(rows))
        one = mm.prepare(raw, int(T[name]), k, config=replace(mm.DEFAULT_CONFIG, gemm_chunk_bytes=0))
        chunked = mm.prepare(raw, int(T[name]), k, config=replace(mm.DEFAULT_CONFIG, gemm_chunk_bytes=1))
        assert mm.chunk_rows(chunked) == mm.GEMM_ROWS_STEP and mm.chunk_rows(one) > x.shape[0]
        np.testing.assert_array_equal(mm.matmul(chunked, x), mm.matmul(one, x), err_msg=f"{name} {rows} rows")


ROWS_GEMV = mm.KernelConfig(gemv_x16=False)     # n == 1 on the original rows (x86: kgemv) even with an x16 copy


@pytest.mark.parametrize("name", KQUANT)
def test_kquant_single_row_kernel(name, monkeypatch):
    """n == 1 K-quant path (x86 with gemv_x16 off: simd.kgemv_kernel, u8 x s8 pair products; Q4_K / Q5_K read permuted
    activations, Q6_K int16 sums per 16) = the generic tile kernels = the reference, also for
    extreme quants and scales (all-ones bytes: 6-bit scales / mins of 63, Q6_K q = 63, scale -1)
    and activations at +-127, where an int16 overflow would show."""
    rng = np.random.default_rng(11)
    rows, k = 19, 1280
    bs = GGML_QUANT_SIZES[T[name]][1]
    for raw in (random_kquant(name, rows, k, rng), np.full((rows, k // 256 * bs), 255, np.uint8)):
        blk = raw.reshape(rows, k // 256, -1)
        o, nsc = KSCALE[name]
        blk[..., o:o + 2 * nsc] = np.array([0.01, 0.002][:nsc], np.float16).view(np.uint8)
        for x in (rng.standard_normal((1, k)).astype(np.float32),
                  np.where(rng.random((1, k)) < 0.5, -1.0, 1.0).astype(np.float32)):
            ref = reference(raw, name, k, x)
            y = mm.matmul(mm.prepare(raw, int(T[name]), k, config=ROWS_GEMV), x)   # x86: kgemv
            assert rel(y, ref) < 2e-6, (name, rel(y, ref))
            yd = mm.matmul(mm.prepare(raw, int(T[name]), k), x)   # default: x86 x16 groups + ktile tail rows
            assert rel(yd, ref) < 2e-6, (name, rel(yd, ref))
            y4 = mm.matmul(mm.prepare(raw, int(T[name]), k), np.repeat(x, 4, 0))  # n > 1: ktile kernels
            np.testing.assert_allclose(y4[0], y[0], rtol=2e-6, atol=2e-6 * np.abs(y).max())
    # the helpers
    xq = rng.integers(-128, 128, (2, 512)).astype(np.int8)
    b16 = np.empty((2, 32), np.int16)
    mm.bsums16(xq, b16)
    np.testing.assert_array_equal(b16, xq.reshape(2, 32, 16).astype(np.int64).sum(-1))
    xp = xq.copy()
    mm.permute_q4k(xp)
    perm = np.array(mm.simd.Q4K_GEMV_PERM)
    np.testing.assert_array_equal(xp.reshape(2, 2, 8, 32), xq.reshape(2, 2, 8, 32)[:, :, perm])


@pytest.mark.parametrize("name", [n for n in KQUANT if quants.type_info(n).repacked is not None])
def test_kquant_x16_generic_quads(name, monkeypatch):
    """The x16 K kernel compiled without AVX-512 VNNI (Emitter.dot_quads' vpmaddubsw / int16 paths: what
    AVX2 hosts get; aarch64 runs its own 4-row layouts, so it skips) gives the bit-identical floats of the matmul driver (vpdpbusd where the
    host has it), for random and all-ones bytes (IQ4_XS: table + 128 = 241, past vpmaddubsw's range)."""
    import numba
    from tinyinfer.kernels import simd
    e = quants.type_info(name)
    fmt = e.repacked
    rng = np.random.default_rng(20)
    k = 512
    for raw in (random_kquant(name, 16, k, rng), np.full((16, e.row_bytes(k)), 255, np.uint8)):
        o, nsc = KSCALE[name]
        raw.reshape(16, k // 256, -1)[..., o:o + 2 * nsc] = np.array([0.01, 0.002][:nsc], np.float16).view(np.uint8)
        x = np.where(rng.random((2, k)) < 0.5, -1.0, 1.0).astype(np.float32) * rng.random((2, k)).astype(np.float32)
        pw = mm.prepare(raw, int(T[name]), k, repack=True)
        if pw.packed is None:            # aarch64: its 4-row layouts come first, the x16 ones are x86's
            pytest.skip("no x16 layout on this host")
        ref = mm.matmul(pw, x)
        xq, xd, _, xb = mm.quantize_activations(x, "q8_K")
        if fmt.xsums == 16:
            xb = np.empty((2, k // 16), np.int16)
            mm.bsums16(xq, xb)
        elif fmt.xsums == -32:
            xb = xb.astype(np.int16)
        monkeypatch.setattr(simd, "VNNI512", False)
        kern = simd.kinterleaved_kernel(fmt, 1)

        @numba.njit(cache=False)
        def run(wg, xq, xd, xb, out):          # compiled now: the kernel's IR reads VNNI512 = False
            for c in range(xq.shape[0]):
                kern(wg.ctypes.data, k // 256, xq[c:].ctypes.data, xq.strides[0], xd[c:].ctypes.data,
                     xd.strides[0], xb[c:].ctypes.data, xb.strides[0], out[c:].ctypes.data, out.strides[0])

        out = np.full((2, 16), np.nan, np.float32)
        run(pw.packed[0], xq, xd, xb, out)
        monkeypatch.undo()
        np.testing.assert_array_equal(out, ref, err_msg=name)


def test_zero_rows_of_x_and_zero_activations():
    rng = np.random.default_rng(7)
    raw, _ = make_weight("Q8_0", 20, 64, rng)
    pw = mm.prepare(raw, int(T.Q8_0), 64)
    assert mm.matmul(pw, np.zeros((0, 64), np.float32)).shape == (0, 20)
    np.testing.assert_array_equal(mm.matmul(pw, np.zeros((2, 64), np.float32)), 0)


def test_one_dimensional_buffer_and_non_contiguous_x():
    rng = np.random.default_rng(8)
    raw, _ = make_weight("Q4_0", 24, 64, rng)
    pw = mm.prepare(raw.reshape(-1), int(T.Q4_0), 64)
    assert pw.rows == 24
    x = rng.standard_normal((64, 6)).astype(np.float32).T     # (6, 64), not C-contiguous
    np.testing.assert_array_equal(mm.matmul(pw, x), mm.matmul(pw, np.ascontiguousarray(x)))


def test_errors_are_clear():
    rng = np.random.default_rng(9)
    raw, _ = make_weight("Q4_0", 8, 64, rng)
    q4 = int(T.Q4_0)
    with pytest.raises(ValueError, match="unsupported weight type"):
        mm.prepare(raw, int(T.IQ2_XXS), 64)
    with pytest.raises(ValueError, match="multiple of"):
        mm.prepare(raw, q4, 48)
    with pytest.raises(ValueError, match="rows of 72 bytes"):
        mm.prepare(raw, q4, 64 * 2)
    with pytest.raises(ValueError, match="uint8"):
        mm.prepare(raw.view(np.int8), q4, 64)
    with pytest.raises(ValueError, match="whole number"):
        mm.prepare(raw.reshape(-1)[:-1], q4, 64)
    with pytest.raises(ValueError, match="no rows"):
        mm.prepare(raw[:0], q4, 64)
    pw = mm.prepare(raw, q4, 64)
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        mm.matmul(pw, np.zeros((2, 65), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        mm.matmul(pw, np.zeros((2, 2, 64), np.float32))
    with pytest.raises(ValueError, match="float32"):
        mm.matmul(pw, np.zeros((2, 64), np.float64))
    with pytest.raises(ValueError, match="out must be"):
        mm.matmul(pw, np.zeros((2, 64), np.float32), np.zeros((2, 9), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        mm.matmul(pw, np.zeros((2, 64), np.float32), np.zeros((8, 2), np.float32).T)
    with pytest.raises(ValueError, match="overlap"):
        sq = mm.prepare(make_weight("F32", 64, 64, rng)[0], int(T.F32), 64)
        xx = np.ones((2, 64), np.float32)
        mm.matmul(sq, xx, xx)
    with pytest.raises(TypeError):
        mm.matmul(raw, np.zeros((2, 64), np.float32))


def test_concurrent_calls_from_threads_are_safe():
    """The server runs slots in threads: temporaries inside the jitted drivers must stay alive
    while the kernels read them through raw pointers (a freed buffer reused by another thread's
    allocation once gave garbage here)."""
    import threading
    import numba
    from tinyinfer.kernels.quants import quantize
    mm.matmul(mm.prepare(quantize(np.ones((64, 256), np.float32), 8), 8, 256), np.ones((64, 256), np.float32))
    rng = np.random.default_rng(5)
    for typ, rows, k in ((8, 1536, 576), (12, 1024, 512)):          # Q8_0 (repacked on x86), Q4_K
        w = quantize(rng.standard_normal((rows, k)).astype(np.float32), typ)
        pw = mm.prepare(w, typ, k)
        xs = [rng.standard_normal((n, k)).astype(np.float32) for n in (1, 40)]
        refs = [mm.matmul(pw, x).copy() for x in xs]
        bad = []

        def run():
            for _ in range(60):
                for x, ref in zip(xs, refs):
                    if not np.array_equal(mm.matmul(pw, x), ref):
                        bad.append(1)
        ts = [threading.Thread(target=run) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not bad, f"type {typ}: {len(bad)} wrong results under concurrency"


# ------------------------------------------- aarch64 4-row layouts (kernels/arm.py)


def _arm_weight(name, rows, k, rng, extreme=False):
    if name in KQUANT:
        raw = random_kquant(name, rows, k, rng)
        if extreme:        # 6-bit scales / mins 63, nibbles 15, Q6_K q = 63 and scale -1
            raw[:] = 255
            o, nsc = KSCALE[name]
            raw.reshape(rows, k // 256, -1)[..., o:o + 2 * nsc] = np.array([0.01, 0.002][:nsc], np.float16).view(np.uint8)
        return raw
    raw, _ = make_weight(name, rows, k, rng)
    if extreme:
        blk = raw.reshape(rows, k // 32, -1)
        blk[..., 2:] = 0x80 if name == "Q8_0" else 0x00      # q = -128 (Q8_0) / nibbles 0: -8 (Q4_0), -127 (IQ4_NL)
        if name in ("Q4_1", "Q5_0", "Q5_1"):                 # the 4-row kernels' unsigned quants: 15 / 31
            blk[..., 2 if name == "Q5_0" else 4:] = 0xFF
    return raw


@pytest.mark.parametrize("name", ARM_TYPES)
def test_arm_layout_round_trip(name):
    """The 4-row layouts keep every byte (numpy repack / unpack), scales and mins of Q4_K included."""
    from tinyinfer.kernels import arm
    rng = np.random.default_rng(21)
    k = 512
    bs = GGML_QUANT_SIZES[T[name]][1]
    raw = rng.integers(0, 256, (12, k // GGML_QUANT_SIZES[T[name]][0] * bs), dtype=np.uint8)
    lay = arm.layout(name)
    p = lay.repack(raw)
    assert p.shape == (3, k // lay.qk, lay.group_bytes)
    np.testing.assert_array_equal(lay.unpack(p), raw)


@pytest.mark.parametrize("name", ARM_TYPES)
def test_arm_kernels_match_reference(name):
    """kernels/arm.py's drivers (here: the flavour this CPU gets; on x86 the generic no-dotprod one)
    = the reference, n = 1 (GEMV), n = 6 (a 4-row GEMM tile + 2 single rows) and n = 13 (8 + 4 + 1 or 10 + 3 x 1
    rows where arm.GEMM_NC says 8 or 10; each row bit-identical to its GEMV), also at the value
    extremes where an int16 partial sum of the no-dotprod flavour would overflow. Odd block counts
    (3 super-blocks, 11 blocks): the GEMV loops unrolled by two (arm.UNROLL) run their remainder too."""
    cfg = mm.KernelConfig(arm=True)
    rng = np.random.default_rng(22)
    rows, k = 12, 768 if name in KQUANT else 352
    for extreme in (False, True):
        raw = _arm_weight(name, rows, k, rng, extreme)
        pw = mm.prepare(raw, int(T[name]), k, config=cfg)
        assert pw.arm is not None, pw
        for n in (1, 6, 13):
            x = rng.standard_normal((n, k)).astype(np.float32)
            if extreme:
                x = np.where(rng.random((n, k)) < 0.9, -1.0, 1.0).astype(np.float32)
            y = mm.matmul(pw, x)
            ref = reference(raw, name, k, x)
            assert rel(y, ref) < 2e-6, (name, extreme, n, rel(y, ref))
            if n == 13:         # 8/10- (arm.GEMM_NC), 4- and 1-row calls: each row as its GEMV, bit for bit
                np.testing.assert_array_equal(y, np.concatenate([mm.matmul(pw, x[i:i + 1]) for i in range(n)]))
            if not extreme:     # the prange driver gives the serial driver's numbers
                pp = mm.prepare(raw, int(T[name]), k, config=mm.KernelConfig(arm=True, parallel_min_bytes=0))
                np.testing.assert_array_equal(mm.matmul(pp, x), y)
    assert mm.prepare(raw, int(T[name]), k, config=mm.KernelConfig(arm=False)).arm is None
    assert mm.prepare(raw, int(T[name]), k, repack=False, config=cfg).arm is None

