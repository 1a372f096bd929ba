"""The non-matmul kernels (kernels/ops.py) against plain numpy references."""

import math

import numpy as np
import pytest

from tinyinfer.kernels import ops


def ref_attention(q, K, V, pos0, scale, window, softcap):
    """Plain numpy: K/V indexed by position (n_pos, n_kv, hd)."""
    n, nh, _ = q.shape
    nkv = K.shape[1]
    out = np.zeros((n, nh, V.shape[2]), np.float64)
    for i in range(n):
        p = pos0 + i
        lo = max(0, p - window + 1) if window > 0 else 0
        for h in range(nh):
            kv = h // (nh // nkv)
            s = K[lo:p + 1, kv].astype(np.float64) @ q[i, h].astype(np.float64) * scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, h] = w @ V[lo:p + 1, kv]
    return out


@pytest.mark.parametrize("nh,nkv,window,softcap,n_rows,pos0,n", [
    (9, 3, 0, 0.0, 64, 0, 40),        # GQA, prefill
    (9, 3, 0, 0.0, 64, 39, 1),        # decode
    (4, 1, 8, 0.0, 8 + 5, 30, 5),     # sliding window, ring of window + n_batch rows
    (4, 4, 0, 50.0, 32, 3, 7),        # MHA with softcap
    (8, 2, 6, 30.0, 6 + 4, 17, 4),    # window + softcap, ring wraps
])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_matches_numpy(nh, nkv, window, softcap, n_rows, pos0, n, threads):
    import numba
    rng = np.random.default_rng(nh * 100 + pos0)
    hd = 32
    n_pos = pos0 + n
    K = rng.standard_normal((n_pos, nkv, hd)).astype(np.float32)
    V = rng.standard_normal((n_pos, nkv, hd)).astype(np.float32)
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    kc = np.full((n_rows, nkv, hd), np.nan, np.float32)
    vc = np.full((n_rows, nkv, hd), np.nan, np.float32)
    for p in range(max(0, n_pos - n_rows), n_pos):     # what a ring holds after writing 0..n_pos-1
        kc[p % n_rows] = K[p]
        vc[p % n_rows] = V[p]
    out = np.empty((n, nh, hd), np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        ops.attention(q, kc, vc, pos0, np.float32(hd ** -0.5), window, np.float32(softcap), out)
    finally:
        numba.set_num_threads(old)
    ref = ref_attention(q, K, V, pos0, hd ** -0.5, window, softcap)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_exp_and_f16_rounding():
    x = np.linspace(-87, 88, 200001).astype(np.float32)
    e = ops.exp_array(x, np.empty_like(x))
    np.testing.assert_allclose(e, np.exp(x.astype(np.float64)), rtol=1e-6)
    y = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    np.testing.assert_array_equal(ops.round_f16_array(y, np.empty_like(y)), y.astype(np.float16).astype(np.float32))


def ref_rope(x, pos, n_rot, base, neox):
    x = x.astype(np.float64).copy()
    half = n_rot // 2
    for i, p in enumerate(pos):
        th = p * base ** (-2.0 * np.arange(half) / n_rot)
        c, s = np.cos(th), np.sin(th)
        if neox:
            a, b = x[i, :, :half].copy(), x[i, :, half:n_rot].copy()
            x[i, :, :half], x[i, :, half:n_rot] = a * c - b * s, a * s + b * c
        else:
            a, b = x[i, :, 0:n_rot:2].copy(), x[i, :, 1:n_rot:2].copy()
            x[i, :, 0:n_rot:2], x[i, :, 1:n_rot:2] = a * c - b * s, a * s + b * c
    return x


@pytest.mark.parametrize("neox", [False, True])
def test_rope(neox):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    pos = np.arange(100, 105)
    cos, sin = ops.rope_cache(pos, 16, 10000.0, 1.0)
    y = x.copy()
    ops.rope(y, cos, sin, neox)
    np.testing.assert_allclose(y, ref_rope(x, pos, 16, 10000.0, neox), rtol=1e-5, atol=1e-5)


def test_rmsnorm_and_fused_residual_norms():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    h = rng.standard_normal((4, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    wh = rng.standard_normal(64).astype(np.float32)
    eps = np.float32(1e-6)

    def rn(a, w):
        a = a.astype(np.float64)
        return a / np.sqrt((a * a).mean(1, keepdims=True) + eps) * w
    np.testing.assert_allclose(ops.rmsnorm(x, w, eps, np.empty_like(x)), rn(x, w), rtol=1e-5, atol=1e-6)
    x1 = x.copy()
    out = ops.add_rmsnorm(x1, h, w, eps, np.empty_like(x))
    np.testing.assert_allclose(x1, x + h, rtol=1e-6)
    np.testing.assert_allclose(out, rn(x + h, w), rtol=1e-5, atol=1e-5)
    x2 = x.copy()
    out = ops.add_normed_rmsnorm(x2, h, wh, w, eps, np.empty_like(x))
    np.testing.assert_allclose(x2, x + rn(h, wh), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, rn(x + rn(h, wh), w), rtol=1e-4, atol=1e-5)


def test_gated_activations_split():
    rng = np.random.default_rng(3)
    gu = (rng.standard_normal((3, 2 * 40)) * 4).astype(np.float32)
    g, u = gu[:, :40].astype(np.float64), gu[:, 40:]
    np.testing.assert_allclose(ops.silu_mul_split(gu, np.empty((3, 40), np.float32)),
                               g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    c = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(ops.gelu_mul_split(gu, np.empty((3, 40), np.float32)),
                               0.5 * g * (1 + np.tanh(c * g * (1 + 0.044715 * g * g))) * u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox,norm", [(False, False), (True, True)])
def test_qkv_store(neox, norm):
    rng = np.random.default_rng(4)
    nh, nkv, hd, n, pos0, n_rows = 4, 2, 16, 3, 6, 8
    qkv = rng.standard_normal((n, (nh + 2 * nkv) * hd)).astype(np.float32)
    qn = rng.standard_normal(hd).astype(np.float32) if norm else np.zeros(0, np.float32)
    kn = rng.standard_normal(hd).astype(np.float32) if norm else np.zeros(0, np.float32)
    eps = np.float32(1e-6)
    pos = np.arange(pos0, pos0 + n)
    cos, sin = ops.rope_cache(pos, hd, 10000.0, 1.0)
    kc = np.zeros((n_rows, nkv, hd), np.float32)
    vc = np.zeros((n_rows, nkv, hd), np.float32)
    q = np.empty((n, nh, hd), np.float32)
    ops.qkv_store(qkv, nh, nkv, hd, hd, qn, kn, eps, cos, sin, neox, kc, vc, pos0, q)
    rq = qkv[:, :nh * hd].reshape(n, nh, hd).copy()
    rk = qkv[:, nh * hd:(nh + nkv) * hd].reshape(n, nkv, hd).copy()
    rv = qkv[:, (nh + nkv) * hd:].reshape(n, nkv, hd)
    if norm:
        ops.rmsnorm_heads(rq, qn, eps)
        ops.rmsnorm_heads(rk, kn, eps)
    rows = pos % n_rows
    np.testing.assert_allclose(q, ref_rope(rq, pos, hd, 10000.0, neox), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kc[rows], ref_rope(rk, pos, hd, 10000.0, neox).astype(np.float16).astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(vc[rows], rv.astype(np.float16).astype(np.float32))
