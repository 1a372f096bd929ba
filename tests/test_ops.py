"""The non-matmul kernels (kernels/ops.py) against plain numpy references."""

import math
import os

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


def _store(typ, n_seq, n_rows, nkv, hd):
    from tinyinfer.kvcache import KVStore
    return KVStore(typ, n_seq, n_rows, nkv, hd)


@pytest.mark.parametrize("nh,nkv,window,softcap,n_rows,pos0,n", [
    (9, 3, 0, 0.0, 64, 0, 40),        # GQA, prefill
    (9, 3, 0, 0.0, 64, 39, 1),        # decode
    (4, 1, 8, 0.0, 8 + 5, 30, 5),     # sliding window, ring of window + n_batch rows
    (4, 4, 0, 50.0, 32, 3, 7),        # MHA with softcap
    (8, 2, 6, 30.0, 6 + 4, 17, 4),    # window + softcap, ring wraps
    (9, 3, 0, 0.0, 700, 560, 40),     # a prompt chunk over a long context: the matrix-product path
    (4, 4, 0, 50.0, 700, 600, 64),    # ... with softcap
])
@pytest.mark.parametrize("threads,typ", [(1, "f16"), (2, "f16"), (1, "q8_0"), (2, "q4_0")])
def test_attention_matches_numpy(nh, nkv, window, softcap, n_rows, pos0, n, threads, typ, monkeypatch):
    """Sequence 1 of a two-sequence cache (sequence 0 holds other values), any cache type: the
    reference attends over the values the cache holds (dequantized). Two threads: the parallel driver,
    whatever the size (these are below the size where attention() takes it by itself)."""
    import numba
    if threads > 1:
        monkeypatch.setattr(ops, "_PARALLEL_MIN_WORK", 0)
    from tinyinfer.kvcache import Batch
    rng = np.random.default_rng(nh * 100 + pos0)
    hd = 32
    n_pos = pos0 + n
    K = rng.standard_normal((n_pos, nkv, hd)).astype(np.float32)
    V = rng.standard_normal((n_pos, nkv, hd)).astype(np.float32)
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    kc, vc = _store(typ, 2, n_rows, nkv, hd), _store(typ, 2, n_rows, nkv, hd)
    for st in (kc, vc):          # sequence 0: garbage that must not be read
        other = rng.standard_normal((n_rows, nkv, hd)).astype(np.float32) * 100
        ops.kv_store_rows(st.q[0:1], st.d[0:1], st.kind, st.rot, other)
    Kq, Vq = K.copy(), V.copy()
    for p in range(max(0, n_pos - n_rows), n_pos):     # what a ring holds after writing 0..n_pos-1
        for st, X, Xq in ((kc, K, Kq), (vc, V, Vq)):
            r = p % n_rows
            ops.kv_store_rows(st.q[1:2, r:r + 1], st.d[1:2, r:r + 1], st.kind, st.rot, X[p:p + 1])
            Xq[p] = st.to_float(1, r, r + 1)[0]
    out = np.empty((n, nh, hd), np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    b = Batch.run(1, pos0, n)
    qr = ops.fwht_rows(q.copy()) if kc.rot else q          # qkv_store rotates the queries with the keys
    try:
        ops.attention(qr, kc, vc, b.pos, b.seq, np.float32(hd ** -0.5), window, np.float32(softcap), out)
    finally:
        numba.set_num_threads(old)
    ref = ref_attention(q, Kq, Vq, pos0, hd ** -0.5, window, softcap)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    if typ == "f16":     # the f16 values are the inputs rounded to half precision
        lo = max(0, n_pos - n_rows)
        np.testing.assert_array_equal(Kq[lo:], K[lo:].astype(np.float16).astype(np.float32))


def _odd(shape, off):
    """A C-contiguous float32 array whose data starts ``off`` floats past an allocation's start (its
    address differs from a fresh array's: kernels must not vectorize by it)."""
    n = int(np.prod(shape))
    return np.zeros(n + off, np.float32)[off:].reshape(shape)


def _decode_paths(ops, typ, hd, off, nh=9, nkv=3):
    """A decode step of four sequences at different depths plus a five-token run of a fifth, through
    each path a row can take: the batch (qkv_store, then the parallel driver on two threads and the
    serial one) and each token alone (decode_attention: the fused call of a one-token step, in
    order). Buffers start at odd offsets (``off``) after a few odd-sized allocations. Returns the
    three outputs and the cells each path stored."""
    import numba
    rng = np.random.default_rng(26 + hd)
    rows = 96
    pos = np.array([5, 40, 77, 90, 20, 21, 22, 23, 24], np.int64)
    seq = np.array([0, 1, 2, 3, 4, 4, 4, 4, 4], np.int64)
    n = pos.size
    kc, vc = _store(typ, 5, rows, nkv, hd), _store(typ, 5, rows, nkv, hd)
    for st in (kc, vc):
        for sq in range(5):
            ops.kv_store_rows(st.q[sq:sq + 1], st.d[sq:sq + 1], st.kind, st.rot,
                              rng.standard_normal((rows, nkv, hd)).astype(np.float32))
    qkv0 = rng.standard_normal((n, (nh + 2 * nkv) * hd)).astype(np.float32)
    qn, kn = (rng.standard_normal(hd).astype(np.float32) for _ in range(2))
    heads = ops.heads_record(nh, nkv, hd, hd, qn, kn, 1e-6)
    cos, sin = ops.rope_cache(pos, hd, 10000.0, 1.0)
    attn = ops.attn_record(0.125, 0, 0.0)
    junk = [np.empty(7 * j + off, np.float32) for j in range(1, 9)]       # noqa: F841 (shifts the heap)

    def caches():
        return [(st.q.copy(), st.d.copy(), st.kind, st.rot) for st in (kc, vc)]

    k, v = caches()
    qkv, q = _odd(qkv0.shape, off), _odd((n, nh, hd), off + 1)
    qkv[:] = qkv0
    ops.qkv_store(qkv, heads, (cos, sin, True), k, v, pos, seq, q)
    serial = ops._attention_serial(q, k, v, pos, seq, attn, _odd((n, nh, hd), off + 3))
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        par = ops._attention_parallel(q, k, v, pos, seq, attn, _odd((n, nh, hd), off + 5))
    finally:
        numba.set_num_threads(old)
    k1, v1 = caches()
    alone = np.empty((n, nh, hd), np.float32)
    for i in range(n):
        x = _odd((1, qkv0.shape[1]), off + 2 * i + 1)
        x[:] = qkv0[i:i + 1]
        o = _odd((1, nh, hd), off + i)
        ops.decode_attention(x, heads, (cos[i:i + 1], sin[i:i + 1], True), k1, v1, pos[i:i + 1], seq[i:i + 1],
                             _odd((1, nh, hd), off + 7), attn, o)
        alone[i] = o[0]
    return serial, par, alone, (k, v), (k1, v1)


@pytest.mark.parametrize("typ,hd,nh,nkv", [("f16", 64, 9, 3), ("q8_0", 64, 9, 3), ("f16", 40, 9, 3),
                                            ("f16", 128, 8, 2), ("f16", 80, 4, 4), ("q4_0", 64, 8, 1)])
def test_attention_drivers_agree_bit_for_bit(typ, hd, nh, nkv):
    """A row's attention (with its q/k RMSNorm and RoPE) gives identical floats through the parallel
    driver, the serial one and the one-token decode call, whatever the buffers' addresses: attention()
    may pick a driver by size and a decode step by batch size without changing a row's numbers (batch
    invariance). The task's loops once ran under fastmath reassoc, and LLVM vectorized each compiled
    driver its own way (hd 40: a tail after the 16-lane blocks). f16 cells with hd a multiple of 16 take
    the vector kernels (simd.attn_*: blocks of keys, heads and elements that differ between a one-kv-head
    task of the parallel driver and the serial one's all-heads task)."""
    for off in (0, 1, 3):
        serial, par, alone, (k, v), (k1, v1) = _decode_paths(ops, typ, hd, off, nh, nkv)
        np.testing.assert_array_equal(par, serial)
        np.testing.assert_array_equal(alone, serial)
        for a, b in zip(k + v, k1 + v1):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)


def test_attention_gemm_path_in_slices_equals_the_loops(monkeypatch):
    """The prompt-chunk path cut into query slices (a small score budget) gives the loops' result."""
    from tinyinfer.kvcache import Batch
    rng = np.random.default_rng(7)
    nh, nkv, hd, pos0, n = 6, 2, 64, 600, 48
    kc, vc = _store("q8_0", 1, pos0 + n, nkv, hd), _store("q8_0", 1, pos0 + n, nkv, hd)
    for st in (kc, vc):
        ops.kv_store_rows(st.q, st.d, st.kind, st.rot, rng.standard_normal((pos0 + n, nkv, hd)).astype(np.float32))
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    b = Batch.run(0, pos0, n)
    loops = ops._attention_serial(q, kc.arrays, vc.arrays, b.pos, b.seq, ops.attn_record(0.125, 0, 0.0),
                                  np.empty((n, nh, hd), np.float32))
    monkeypatch.setattr(ops, "_BLAS_SCORES_BYTES", 4 * 3 * (pos0 + n) * 5)     # 5 tokens per slice
    calls = []
    gemm = ops._attention_gemm
    monkeypatch.setattr(ops, "_attention_gemm", lambda *a: calls.append(1) or gemm(*a))
    out = ops.attention(q, kc, vc, b.pos, b.seq, np.float32(0.125), 0, np.float32(0.0),
                        np.empty((n, nh, hd), np.float32))
    assert calls                                       # the chunk took the matrix-product path
    np.testing.assert_allclose(out, loops, rtol=1e-5, atol=1e-6)


def test_attention_batch_of_sequences_equals_one_at_a_time():
    """A decode batch (one token of each of 3 sequences at different positions) gives each token
    what it gets alone, bit for bit."""
    from tinyinfer.kvcache import Batch
    rng = np.random.default_rng(7)
    nh, nkv, hd, rows = 6, 2, 64, 40
    kc, vc = _store("f16", 3, rows, nkv, hd), _store("f16", 3, rows, nkv, hd)
    for st in (kc, vc):
        for s in range(3):
            ops.kv_store_rows(st.q[s:s + 1], st.d[s:s + 1], st.kind, st.rot,
                              rng.standard_normal((rows, nkv, hd)).astype(np.float32))
    q = rng.standard_normal((3, nh, hd)).astype(np.float32)
    b = Batch.one_each([2, 0, 1], [11, 30, 3])
    out = np.empty((3, nh, hd), np.float32)
    ops.attention(q, kc, vc, b.pos, b.seq, np.float32(0.125), 0, np.float32(0), out)
    for i in range(3):
        one = np.empty((1, nh, hd), np.float32)
        bi = Batch.one_each([b.seq[i]], [b.pos[i]])
        ops.attention(q[i:i + 1], kc, vc, bi.pos, bi.seq, np.float32(0.125), 0, np.float32(0), one)
        np.testing.assert_array_equal(out[i], one[0])


@pytest.mark.parametrize("typ", ["f16", "q8_0", "q4_0"])
def test_kv_cache_types_store_ggml_bytes(typ):
    """The cache holds what ggml's reference quantizer makes (the gguf package's), and reads back
    what its dequantizer gives."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants as gq
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 2, 64)) * rng.uniform(0.01, 50, (6, 2, 1))).astype(np.float32)
    x[0, 0] = 0.0                                       # an all-zero block
    st = _store(typ, 1, 6, 2, 64)
    ops.kv_store_rows(st.q, st.d, st.kind, st.rot, x)
    back = st.to_float(0, 0, 6)
    if typ == "f16":
        np.testing.assert_array_equal(st.q[0].view(np.float16), x.astype(np.float16))
        np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))
        return
    gt = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[typ]
    assert st.rot                     # quantized cells hold H x / 8 (H: the 64 x 64 Walsh-Hadamard matrix)
    H = np.array([[1.0]])
    while H.shape[0] < 64:
        H = np.block([[H, H], [H, -H]])
    xr = (x.reshape(-1, 64).astype(np.float64) @ H.T / 8).astype(np.float32)
    ref = gq.quantize(xr, gt).reshape(6 * 2 * 2, -1)        # one row per block of 32
    ours = np.concatenate([st.d[0].reshape(-1, 1).view(np.uint8),
                           st.q[0].reshape(6 * 2 * 2, -1).view(np.uint8)], axis=1)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(back.reshape(-1, 64), gq.dequantize(ref.reshape(12, -1), gt) @ H / 8, atol=1e-5)


@pytest.mark.parametrize("typ,neox", [("f16", False), ("q8_0", True), ("q4_0", False)])
def test_kv_shift_rerotates_keys(typ, neox):
    """After dropping cells [keep, keep+d), cell i holds what storing the key at position i would
    have given: rotating by -d composes with the stored rotation (up to the type's rounding)."""
    from tinyinfer.kvcache import KVStore
    rng = np.random.default_rng(9)
    nkv, hd, n_past, keep, dd = 2, 64, 20, 3, 5
    raw = rng.standard_normal((n_past, nkv, hd)).astype(np.float32)
    pos = np.arange(n_past)
    cos, sin = ops.rope_cache(pos, hd, 10000.0, 1.0)
    rot = raw.copy()
    ops.rope(rot, cos, sin, neox)
    k = KVStore(typ, 2, n_past, nkv, hd)
    v = KVStore(typ, 2, n_past, nkv, hd)
    ops.kv_store_rows(k.q[1:2], k.d[1:2], k.kind, k.rot, rot)
    ops.kv_store_rows(v.q[1:2], v.d[1:2], v.kind, v.rot, raw)
    v_before = v.to_float(1, 0, n_past)
    c1, s1 = ops.rope_cache(np.array([-dd]), hd, 10000.0, 1.0)
    ops.kv_shift(k.q, k.d, k.kind, k.rot, 1, keep, dd, n_past, c1[0], s1[0], neox, True)
    ops.kv_shift(v.q, v.d, v.kind, v.rot, 1, keep, dd, n_past, c1[0], s1[0], neox, False)
    n_new = n_past - dd
    want = raw[np.r_[0:keep, keep + dd:n_past]].copy()
    cw, sw = ops.rope_cache(np.arange(n_new), hd, 10000.0, 1.0)
    ops.rope(want, cw, sw, neox)
    tol = {"f16": 5e-3, "q8_0": 0.05, "q4_0": 0.6}[typ]
    np.testing.assert_allclose(k.to_float(1, 0, n_new), want, atol=tol)
    np.testing.assert_array_equal(v.to_float(1, 0, n_new), v_before[np.r_[0:keep, keep + dd:n_past]])
    assert not k.q[0].any() and not v.q[0].any()          # the other sequence is untouched


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
    kst, vst = _store("f16", 2, n_rows, nkv, hd), _store("f16", 2, n_rows, nkv, hd)
    q = np.empty((n, nh, hd), np.float32)
    seq = np.ones(n, np.int64)
    ops.qkv_store(qkv, ops.heads_record(nh, nkv, hd, hd, qn, kn, eps), (cos, sin, neox), kst.arrays, vst.arrays,
                  pos, seq, q)
    kc = kst.q[1].view(np.float16).astype(np.float32)
    vc = vst.q[1].view(np.float16).astype(np.float32)
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


def test_heap_thresholds_set_on_glibc():
    """kernels/heap.py: glibc takes the fixed mmap / trim thresholds at import; glibc's own environment
    variable wins (nothing set then)."""
    import platform
    import subprocess
    import sys
    code = "import tinyinfer.kernels.heap as h; print(h.tune())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    if platform.libc_ver()[0] == "glibc":
        assert out.stdout.strip() == "True"
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_row_parallel_builds_equal_the_serial_ones():
    """The elementwise steps' row-parallel builds (prompt chunks of >= ops.ROWS_PARALLEL_MIN rows,
    models/base.py) give every row the serial build's floats bit for bit, and a row alone gets them too
    (a prompt row and a decode step's row agree), on 2 threads, at odd widths."""
    import numba
    rng = np.random.default_rng(11)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        for n, d in ((64, 2048), (77, 1000), (70, 33)):
            x = rng.standard_normal((n, d)).astype(np.float32) * 3
            h = rng.standard_normal((n, d)).astype(np.float32)
            w, wh = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
            eps = np.float32(1e-5)
            for serial, rows, extra in ((ops.add_rmsnorm, ops.add_rmsnorm_rows, ()),
                                        (ops.add_normed_rmsnorm, ops.add_normed_rmsnorm_rows, (wh,))):
                x1, x2, x3 = x.copy(), x.copy(), x[5:6].copy()
                o1, o2, o3 = np.empty_like(x), np.empty_like(x), np.empty((1, d), np.float32)
                serial(x1, h, *extra, w, eps, o1)
                rows(x2, h, *extra, w, eps, o2)
                serial(x3, h[5:6], *extra, w, eps, o3)
                np.testing.assert_array_equal(x2, x1)
                np.testing.assert_array_equal(o2, o1)
                np.testing.assert_array_equal(o3[0], o2[5])
            gu = rng.standard_normal((n, 2 * d)).astype(np.float32) * 4
            for serial, rows in ((ops.silu_mul_split, ops.silu_mul_split_rows),
                                 (ops.gelu_mul_split, ops.gelu_mul_split_rows)):
                a, b, one = np.empty((n, d), np.float32), np.empty((n, d), np.float32), np.empty((1, d), np.float32)
                serial(gu, a)
                rows(gu, b)
                serial(gu[5:6].copy(), one)
                np.testing.assert_array_equal(b, a)
                np.testing.assert_array_equal(one[0], b[5])
    finally:
        numba.set_num_threads(old)


def _f32(x):
    return np.asarray(x, np.float32)


def _ref_expf(x):
    """kernels/ops.expf in float32 numpy, each operation rounded on its own (no fused multiply-add), as
    the attention task (compiled without fast-math flags) computes it."""
    x = np.minimum(np.maximum(_f32(x), np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5)).astype(np.float32)
    r = (x - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    y = np.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * r + np.float32(c)
    y = ((y * r) * r + r) + np.float32(1.0)
    return _f32(np.ldexp(y, n.astype(np.int32)))


def _ref_lane_tree(v):
    """(..., 16) -> (...): lane l + l + 8, then l + l + 4, l + l + 2, l + l + 1 (float32 adds)."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def ref_attention_bits(q, K, V, scale):
    """The attention of one token over f16 keys/values K, V (L, n_kv, hd: float32 holding f16 values) in
    the documented order, written out in float32 numpy: each score a 16-lane dot (lane l sums the
    elements j = l mod 16 in order by fused multiply-adds, then the lane tree) times scale; the softmax
    as ops._exp_shifted (max, exp(s - max), the sum in 16 lanes then the same tree, then the tail;
    s * (1 / sum)); the output ``acc += w * v`` key by key, each product rounded. The fused multiply-add
    is a float64 multiply-add rounded to float32: exact for these inputs but for a double rounding
    (~2^-28 of operations; none with this test's seeds). head size a multiple of 16."""
    nh, hd = q.shape
    L, nkv, _ = K.shape
    group = nh // nkv
    out = np.zeros((nh, V.shape[2]), np.float32)
    for h in range(nh):
        kh = K[:, h // group].reshape(L, hd // 16, 16).astype(np.float64)
        qh = q[h].reshape(hd // 16, 16).astype(np.float64)
        acc = np.zeros((L, 16), np.float32)
        for c in range(hd // 16):
            acc = _f32(qh[c] * kh[:, c] + acc.astype(np.float64))
        s = _ref_lane_tree(acc) * np.float32(scale)
        e = _ref_expf(s - s.max())
        n16 = L - L % 16
        lanes = np.zeros(16, np.float32)
        for t in range(0, n16, 16):
            lanes = lanes + e[t:t + 16]
        a8 = lanes[:8] + lanes[8:]
        a4 = a8[:4] + a8[4:]
        tot = (a4[0] + a4[2]) + (a4[1] + a4[3])
        for t in range(n16, L):
            tot = tot + e[t]
        w = e * (np.float32(1.0) / tot)
        o = np.zeros(V.shape[2], np.float32)
        for t in range(L):
            o = o + w[t] * V[t, h // group]
        out[h] = o
    return out


@pytest.mark.parametrize("nh,nkv,hd,L", [(9, 3, 64, 37), (8, 2, 48, 16), (4, 4, 128, 70), (8, 1, 32, 5)])
def test_attention_f16_bits_match_the_documented_order(nh, nkv, hd, L):
    """The f16 path of the attention (simd.attn_scores_f16 / attn_pv_f16, blocks of keys, heads and
    chunks) gives exactly the floats of a plain float32 computation in the order the kernels document:
    a decode token through each driver, its cells placed across the ring's wrap, next to other tokens."""
    import numba
    rng = np.random.default_rng(hd + L)
    rows = L + 3
    kc, vc = _store("f16", 3, rows, nkv, hd), _store("f16", 3, rows, nkv, hd)
    for st in (kc, vc):
        st.q[:] = (rng.standard_normal(st.q.shape) * 1.5).astype(np.float16).view(np.uint16)
    # token 0: sequence 1 at position p (rows p - L + 1 .. p mod rows: wraps); token 1: other work
    p = rows + L // 2
    pos = np.array([p, 7], np.int64)
    seq = np.array([1, 2], np.int64)
    q = (rng.standard_normal((2, nh, hd)) * 2).astype(np.float32)
    attn = ops.attn_record(hd ** -0.5, L, 0.0)
    rws = [t % rows for t in range(p - L + 1, p + 1)]
    K = kc.q[1, rws].view(np.float16).astype(np.float32)
    V = vc.q[1, rws].view(np.float16).astype(np.float32)
    ref = ref_attention_bits(q[0], K, V, np.float32(hd ** -0.5))
    args = (q, kc.arrays, vc.arrays, pos, seq, attn)
    serial = ops._attention_serial(*args, np.empty((2, nh, hd), np.float32))
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        par = ops._attention_parallel(*args, np.empty((2, nh, hd), np.float32))
    finally:
        numba.set_num_threads(old)
    alone = ops._attention_serial(q[:1], kc.arrays, vc.arrays, pos[:1], seq[:1], attn, np.empty((1, nh, hd), np.float32))
    np.testing.assert_array_equal(serial[0], ref)
    np.testing.assert_array_equal(par[0], ref)
    np.testing.assert_array_equal(alone[0], ref)
