"""The table of ggml formats (tinyinfer.kernels.quants): dequantizers bit-exact against
the gguf package, quantizers byte-exact against ggml's reference quantizers, and the
SmolLM2 requantization hashes of llama-quantize."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GT
from gguf import quants as gq

from tinyinfer.kernels import quants as Q
from conftest import need_reference

ALL = list(Q.TYPES)
BLOCK_TYPES = [t for t in ALL if Q.TYPES[t].is_quantized]
LEGACY = [GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0]
KQUANTS = [GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K]
IQ4 = [GT.IQ4_NL, GT.IQ4_XS]


def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def same_floats(a, b) -> bool:
    """Bit-equal, except that any NaN equals any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return False
    na, nb = np.isnan(a), np.isnan(b)
    return bool(np.array_equal(na, nb) and np.array_equal(a.view(np.uint32)[~na], b.view(np.uint32)[~nb]))


def det_data(n_rows, k, seed):
    """Platform-independent float32 data (integer hash + exact float32 ops), with edge rows."""
    idx = np.arange(n_rows * k, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x100000000)
    z = idx * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    v = (u - np.float32(0.5)) * np.float32(2.0)
    x = (v * v * v * np.float32(3.0) + v * np.float32(0.25)).reshape(n_rows, k)
    x[0] = 0
    x[1, :300] = np.float32(0.5)
    x[2] *= np.float32(1e-6)
    x[3, ::7] = 0
    x[4] = np.abs(x[4])
    x[5] = -np.abs(x[5])
    return x


# -- the table ----------------------------------------------------------------------------

def test_table_layout_matches_ggml():
    assert {GT(t).name for t in ALL} == {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
    for t, e in Q.TYPES.items():
        assert e.ggml_type == t and e.name == GT(t).name
        assert (e.block_size, e.type_size) == GGML_QUANT_SIZES[t], e.name
        assert e.quantize_rows is not None and e.dequantize_rows is not None
    vd = {e.name: e.vec_dot_type.name for e in Q.TYPES.values()}
    assert vd == {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0",
                  "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K",
                  "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ4_NL": "Q8_0", "IQ4_XS": "Q8_K"}
    # every entry runs, and its layout names fields inside the block
    for e in Q.TYPES.values():
        assert e.runnable, e.name
        assert all(0 <= o < e.type_size for o in e.layout.values()), e.name
    assert Q.type_info("q4_k") is Q.TYPES[GT.Q4_K]
    assert Q.type_info(int(GT.Q8_0)) is Q.TYPES[GT.Q8_0]
    assert Q.row_bytes(GT.Q4_0, 576) == 18 * 18
    assert Q.row_bytes(GT.Q6_K, 512) == 420
    assert Q.TYPES[GT.Q4_0].bits_per_weight == 4.5


def test_unsupported_types_are_named():
    with pytest.raises(Q.UnsupportedTypeError, match=r"^IQ2_XXS is not supported; supported: F32, F16"):
        Q.type_info(GT.IQ2_XXS)
    with pytest.raises(Q.UnsupportedTypeError, match="IQ3_S is not supported"):
        Q.dequantize(np.zeros((1, 110), np.uint8), GT.IQ3_S, 256)
    with pytest.raises(Q.UnsupportedTypeError, match="ggml type 999"):
        Q.type_info(999)
    with pytest.raises(Q.UnsupportedTypeError, match="Q9_9 is not supported"):
        Q.type_info("Q9_9")
    assert issubclass(Q.UnsupportedTypeError, ValueError)
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        Q.row_bytes(GT.Q4_K, 576)
    with pytest.raises(ValueError, match="not a multiple"):
        Q.quantize(np.zeros((2, 40), np.float32), GT.Q8_0)
    with pytest.raises(ValueError, match="whole number"):
        Q.dequantize(np.zeros(35, np.uint8), GT.Q8_0, 32)


# -- fp16 / bf16 -------------------------------------------------------------------------

def test_fp16_conversions_exact():
    h = np.arange(65536, dtype=np.uint16)
    ours = Q.dequantize(h.view(np.uint8), GT.F16, 65536)[0]
    ref = h.view(np.float16).astype(np.float32).view(np.uint32)
    # signalling NaNs: we keep the bits exactly; numpy on aarch64 converts in hardware, which
    # sets the quiet bit (0x7c01 -> 0x7fc02000, not 0x7f802000): compare NaNs modulo that bit
    nan = np.isnan(h.view(np.float16))
    assert np.array_equal(ours.view(np.uint32)[~nan], ref[~nan])
    assert np.array_equal(ours.view(np.uint32)[nan] | 0x00400000, ref[nan] | 0x00400000)

    rng = np.random.default_rng(1)
    u = np.concatenate([
        rng.integers(0, 2 ** 32, 300_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000 - 3000, 0x38800000 + 3000, 97, dtype=np.uint32),   # subnormal halves
        np.arange(0x477FE000, 0x47801000, dtype=np.uint32),                      # around 65504..inf
        np.array([0, 0x7F800000, 0x33000000, 0x33000001, 0x387FF000, 0x387FEFFF], np.uint32),
    ])
    u = np.concatenate([u, u | np.uint32(0x80000000)])
    f = u.view(np.float32)
    f = f[~np.isnan(f)]
    ours = Q.quantize(f.reshape(1, -1), GT.F16).view(np.uint16)[0]
    with np.errstate(over="ignore"):
        assert np.array_equal(ours, f.astype(np.float16).view(np.uint16))
    # F16 and BF16 round trips of the same values
    with np.errstate(over="ignore"):
        f16 = f.astype(np.float16).astype(np.float32)
    assert same_floats(Q.dequantize(Q.quantize(f.reshape(1, -1), GT.F16), GT.F16, f.size)[0], f16)
    bf = Q.quantize(f.reshape(1, -1), GT.BF16)
    assert np.array_equal(bf.reshape(-1), gq.quantize(f, GT.BF16).view(np.uint8).reshape(-1))


# -- dequantizers --------------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL, ids=lambda t: GT(t).name)
def test_dequantize_random_blocks_matches_gguf(t):
    """Random bytes, so fp16 scales are sometimes inf/NaN: compared with NaN == NaN."""
    e = Q.TYPES[t]
    k = e.block_size * 8 if e.block_size > 1 else 256
    raw = np.random.default_rng(int(t)).integers(0, 256, (40, e.row_bytes(k)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, t).reshape(40, k)
    ours = Q.dequantize(raw, t, k)
    assert ours.dtype == np.float32 and ours.shape == (40, k)
    assert same_floats(ours, ref)
    assert same_floats(Q.dequantize(raw.reshape(-1), t, k), ours)   # 1-D bytes work too


@pytest.mark.parametrize("t", [GT.Q4_0, GT.Q6_K], ids=lambda t: GT(t).name)
def test_row_entry_points(t):
    """dequantize_row / quantize_row (one row, in place) agree with the whole-tensor loops."""
    e = Q.TYPES[t]
    x = Q._readonly(det_data(8, 512, 3))
    q = Q.quantize(x, t)
    row = np.empty(e.row_bytes(512), np.uint8)
    e.quantize_row(x[2], row)
    assert np.array_equal(row, q[2])
    y = np.empty(512, np.float32)
    e.dequantize_row(Q._readonly(q[2]), y)
    assert np.array_equal(y, Q.dequantize(q, t, 512)[2])


def _check_file_bit_exact(path, expect_types):
    from tinyinfer.gguf import GGUFFile

    g = GGUFFile(path)
    seen = set()
    chunk = 1 << 21  # elements per comparison, to bound memory
    for name, ti in g.tensors.items():
        seen.add(ti.type_name)
        k = ti.shape[0]
        n = ti.data.shape[0]
        step = max(1, chunk // k)
        for a in range(0, n, step):
            raw = ti.data[a:a + step]
            ours = Q.dequantize(raw, ti.ggml_type, k)
            ref = gq.dequantize(raw, ti.ggml_type).reshape(ours.shape)
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), (name, a)
    assert seen == expect_types


def test_dequantize_every_smollm2_tensor_bit_exact(smollm2_path):
    _check_file_bit_exact(smollm2_path, {"Q4_1", "Q8_0", "F32"})


def test_dequantize_every_gemma3_tensor_bit_exact(gemma3_path):
    _check_file_bit_exact(gemma3_path, {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"})


# -- quantizers ----------------------------------------------------------------------------

def _hard_data():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 512)) * rng.uniform(1e-6, 30, (64, 1))).astype(np.float32)
    x[0] = 0
    x[1, :100] = 0
    x[2] = np.float32(1e-30)               # fp16 scale underflows to 0
    x[3, ::2] = 70000.0                    # fp16 scale overflows
    x[4] = 1.0                             # constant rows
    x[5] = np.round(x[5])                  # integer ties
    x[6] = np.linspace(-8, 8, 512, dtype=np.float32)
    x[7] = (rng.standard_normal(512) ** 5).astype(np.float32)
    return x


@pytest.mark.parametrize("t", LEGACY + [GT.BF16], ids=lambda t: GT(t).name)
def test_legacy_quantizers_match_gguf_reference(t):
    x = _hard_data()
    with np.errstate(all="ignore"):
        ref = gq.quantize(x, t).view(np.uint8).reshape(64, -1)
    assert np.array_equal(Q.quantize(x, t), ref)


def test_f16_f32_converters():
    x = _hard_data()
    with np.errstate(over="ignore"):
        assert np.array_equal(Q.quantize(x, GT.F16), x.astype(np.float16).view(np.uint8))
    assert np.array_equal(Q.quantize(x, GT.F32), x.view(np.uint8))
    assert np.array_equal(Q.dequantize(Q.quantize(x, GT.F32), GT.F32, 512), x)


# sha256 of ggml's quantize_row_*_ref (ggml-quants.c compiled with -ffp-contract=off) on
# det_data(16, 1024, 7); llama.cpp built with FMA contraction differs from itself in a
# few K-quant blocks, so these are the exact reference arithmetic.
DET_SHA = "f637c12d430b4e7a081acc8135c8b64bd5c83ba846a663cf1bdc30de501bf0ff"
GGML_REF_SHA = {
    "Q4_0": "19196cd11d1a6e986ef32466999a4a66e21de0a5a2c8081bede2f500c5036cbe",
    "Q4_1": "deabc99723f8b4137542b4b0b0b3843e349b23a721dfe4436b62c0fcba640f61",
    "Q5_0": "c3629e908950edfb1a8117f542e5dc5c36920c1a22b6f7839d2be4d6e90901b3",
    "Q5_1": "db70bb2bc2972fdb93e36ac3298ccf898d2a741d77054310a102b5eea65e7aa6",
    "Q8_0": "f209f23b07b7481d5556c9d22336f3dca7e2ae133484c6e2bd4609b9ea1f767b",
    "Q2_K": "b9be19ce7b946e1855bd4616569551d7448ebdd3ae2505e3e95dcc9856e56cb6",
    "Q3_K": "11bc68b09abfb8819639a398b559595cbdd8e35d80e17e6bfe3884837693da09",
    "Q4_K": "0d25f6a606f46632ca66f73badfcb34ade9c4cb06fb2e59e362461acc563b477",
    "Q5_K": "c4c063bfa94b2530cde5f9cb295dc84c1f3422457167fb6eb961be16e8c27a93",
    "Q6_K": "cec0610b7f503cdfc0b6b9ad4ceccfe75e7bae5da42c085e8fa567763da64fad",
    # quantize_iq4_nl / quantize_iq4_xs without an importance matrix (what llama-quantize runs),
    # ggml-quants.c compiled the same way
    "IQ4_NL": "b97ce28a203c209c8696eed9a7bbc63012fc5edb1db33b4d5193d694b0b3e332",
    "IQ4_XS": "e3460e66f8f7a1006a44c67be527f4259f6337aa372355acf472f3ea741fca52",
}


@pytest.fixture(scope="module")
def det():
    x = det_data(16, 1024, 7)
    assert sha(x) == DET_SHA
    return x


@pytest.mark.parametrize("t", LEGACY + KQUANTS + IQ4, ids=lambda t: GT(t).name)
def test_quantizers_byte_exact_vs_ggml_reference(det, t):
    assert sha(Q.quantize(det, t)) == GGML_REF_SHA[GT(t).name]


# llama.cpp tests/test-quantize-fns.cpp: data 0.1 + 2 cos(i), total error = ||x - q(x)|| / n
QFNS_LIMIT = {GT.Q2_K: 0.0075, GT.Q3_K: 0.0040, GT.Q4_K: 0.002, GT.Q5_K: 0.002, GT.Q6_K: 0.002,
              GT.Q4_0: 0.002, GT.Q4_1: 0.002, GT.Q5_0: 0.002, GT.Q5_1: 0.002, GT.Q8_0: 0.002,
              GT.F16: 0.002, GT.BF16: 0.002, GT.F32: 0.002, GT.IQ4_NL: 0.002, GT.IQ4_XS: 0.002}


@pytest.mark.parametrize("t", ALL, ids=lambda t: GT(t).name)
def test_quantization_error_within_llama_cpp_limits(t):
    n = 32 * 128
    x = (0.1 + 2 * np.cos(np.arange(n, dtype=np.float64))).astype(np.float32).reshape(1, n)
    y = Q.dequantize(Q.quantize(x, t), t, n)
    err = np.sqrt(np.sum((y.astype(np.float64) - x) ** 2)) / n
    assert err < QFNS_LIMIT[t], (GT(t).name, err)


def test_kquant_error_ordering_on_gaussian_data():
    x = np.random.default_rng(3).standard_normal((16, 4096)).astype(np.float32)
    rmse = {}
    for t in KQUANTS + [GT.Q4_0, GT.Q8_0]:
        rmse[GT(t).name] = float(np.sqrt(np.mean((Q.dequantize(Q.quantize(x, t), t, 4096) - x) ** 2)))
    assert rmse["Q6_K"] < rmse["Q5_K"] < rmse["Q4_K"] < rmse["Q3_K"] < rmse["Q2_K"]
    assert rmse["Q4_K"] < rmse["Q4_0"]          # same 4.5 bits/weight, better
    assert rmse["Q8_0"] < rmse["Q6_K"]
    assert rmse["Q4_K"] < 0.08 and rmse["Q6_K"] < 0.02 and rmse["Q2_K"] < 0.32


def test_requantizing_llama_cpp_kquants_reproduces_them(gemma3_path):
    """llama.cpp's own Q4_K bytes, dequantized and quantized again, come back (nearly) unchanged."""
    from tinyinfer.gguf import GGUFFile

    g = GGUFFile(gemma3_path)
    for name, want in (("blk.0.attn_output.weight", 1.0), ("blk.3.ffn_down.weight", 0.99),
                       ("blk.0.ffn_down.weight", 0.8)):
        t = g.tensors[name]
        e = Q.TYPES[t.ggml_type]
        x = Q.dequantize(t.data, t.ggml_type, t.shape[0])
        q = Q.quantize(x, t.ggml_type)
        same = np.all(q.reshape(-1, e.type_size) == t.data.reshape(-1, e.type_size), axis=1).mean()
        assert same >= want, (name, t.type_name, same)
        y = Q.dequantize(q, t.ggml_type, t.shape[0])
        assert np.sqrt(np.mean((y - x) ** 2)) <= 1e-3 * np.sqrt(np.mean(x ** 2))


def test_threads_do_not_change_results():
    x = np.random.default_rng(9).standard_normal((2048, 1024)).astype(np.float32)
    for t in (GT.Q4_0, GT.Q6_K):
        a = Q.quantize(x[:256], t, threads=1)
        b = Q.quantize(x[:256], t, threads=2)
        assert np.array_equal(a, b)
    q = Q.quantize(x, GT.Q8_0, threads=1)
    assert np.array_equal(Q.dequantize(q, GT.Q8_0, 1024, threads=1), Q.dequantize(q, GT.Q8_0, 1024, threads=3))


# -- requantizing SmolLM2 reproduces llama-quantize's bytes --------------------------------

@pytest.fixture(scope="module")
def smollm2_dequantized(smollm2_path):
    from tinyinfer.gguf import GGUFFile

    g = GGUFFile(smollm2_path)
    t0 = time.perf_counter()
    deq = {n: Q.dequantize(t.data, t.ggml_type, t.shape[0]) for n, t in g.tensors.items()}
    return g, deq, time.perf_counter() - t0


@pytest.mark.parametrize("typ", ["Q4_0", "Q8_0", "F16"])
def test_requant_hashes_match_llama_quantize(smollm2_dequantized, typ):
    ref = json.loads(need_reference("smollm2", "requant_sha256.json").read_text())[typ]
    g, deq, _ = smollm2_dequantized
    assert set(ref) == set(g.tensors)
    matched = 0
    for name, (tname, digest) in ref.items():
        src = g.tensors[name]
        if GT[tname] == src.ggml_type:       # llama-quantize copied it
            data = src.data
        else:
            data = Q.quantize(deq[name], GT[tname])
        assert sha(data) == digest, (typ, name, tname)
        matched += 1
    assert matched == 272


