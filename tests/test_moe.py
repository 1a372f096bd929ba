"""Mixture-of-experts models against llama.cpp: qwen3moe, olmoe, granitemoe, qwen2moe (synthetic files, 8
experts, top-2) in F16 and in Q8_0 / Q4_K_M written by our quantizer byte for byte as llama-quantize writes
them; the MoE block's routing and batching; load-time refusals.

The F16 files come from ../shared/tools/make_arch_models.py (qwen3moe, olmoe) and tests/tools/make_moe_models.py
(granitemoe, qwen2moe) into the model cache; their sha256 and llama.cpp's outputs on them are in tests/data/moe/
(benchmarks/moe_reference.py). Bounds: mean first-step KL(llama.cpp || ours) <= 1e-4 on the four short prompts
and <= 1e-3 on a 900-token one for F16, <= 0.02 for the quantized types; argmax equal where llama.cpp's
top-2 gap >= 0.5; greedy ids equal until the first near tie.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REFERENCE, ROOT, cache_lock, need_reference
from test_inference import check_greedy
from tinyinfer.engine import Engine
from tinyinfer.fetch import _sha256, cache_dir
from tinyinfer.gguf import GGUFFile
from tinyinfer.models import ModelError, load_model

DATA = ROOT / "tests" / "data" / "moe"
FAMILIES = ["qwen3moe", "olmoe", "granitemoe", "qwen2moe"]
QUANT = ["Q8_0", "Q4_K_M"]
# llama.cpp's "Granite MoE Shared" (granitemoe with expert_shared_feed_forward_length and ffn_*_shexp): F16 only
SHEXP = "granitemoe_shexp"
TOP, SAMPLE = 1024, 4096          # as benchmarks/moe_reference.py wrote them


def _sums() -> dict:
    return dict(reversed(line.split()) for line in (DATA / "sha256.txt").read_text().splitlines() if line.strip())


@pytest.fixture(scope="session")
def moe_dir():
    """The four F16 files, generated once into the model cache (sha256 checked every session)."""
    want = _sums()
    out = cache_dir() / "synthetic"
    with cache_lock():
        bad = [a for a in FAMILIES + [SHEXP] if not (out / f"synthetic-{a}-F16.gguf").exists()
               or _sha256(out / f"synthetic-{a}-F16.gguf") != want[f"synthetic-{a}-F16.gguf"]]
        shared = [a for a in bad if a in ("qwen3moe", "olmoe")]
        if shared:
            tool = need_reference("..", "tools", "make_arch_models.py")
            subprocess.run([sys.executable, str(tool), str(REFERENCE / "vocab"), str(out), *shared], check=True,
                           stdout=subprocess.DEVNULL)
        ours = [a for a in bad if a not in shared]
        if ours:
            subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "make_moe_models.py"),
                            str(need_reference("vocab")), str(out), *ours], check=True, stdout=subprocess.DEVNULL)
        for a in bad:
            name = f"synthetic-{a}-F16.gguf"
            assert _sha256(out / name) == want[name], f"{name}: not the bytes llama.cpp's outputs were made from"
    return out


def model_file(moe_dir: Path, arch: str, typ: str) -> Path:
    """The F16 file, or our quantizer's output of it (must be llama-quantize's bytes: its sha256 is recorded)."""
    p = moe_dir / f"synthetic-{arch}-{typ}.gguf"
    if typ == "F16":
        return p
    want = _sums()[p.name]
    with cache_lock():
        if not p.exists() or _sha256(p) != want:
            from tinyinfer.tools.quantize import quantize_file
            tmp = p.with_suffix(".tmp")
            quantize_file(moe_dir / f"synthetic-{arch}-F16.gguf", tmp, typ, progress=False)
            tmp.rename(p)
        assert _sha256(p) == want, f"{p.name}: our quantizer's bytes differ from llama-quantize's"
    return p


def reference(tag: str):
    rows = [json.loads(line) for line in open(DATA / f"greedy_{tag}.jsonl")]
    return rows, dict(np.load(DATA / f"{tag}.npz"))


def kl_estimate(ref: dict, i: int, ours: np.ndarray) -> float:
    """KL(llama.cpp || ours) of prompt i from the stored top tokens and uniform sample (benchmarks/moe_reference.py).

    With d = log p - log q, KL = E_p[d] + log E_p[exp(-d)] (the identity sum_i q_i = 1); both expectations are
    taken over the same tokens, exact over llama.cpp's top ones and estimated for the rest from the sample,
    so the sampling error of the first-order terms cancels and the estimate stays ~ Var_p(d) / 2 (a plain
    sum of p·d over a sample has first-order noise of the size of the bound itself)."""
    n_vocab = int(ref["n_vocab"])
    top = ref["top_ids"][i]
    samp = np.sort(np.random.default_rng(n_vocab).choice(n_vocab, SAMPLE, replace=False))
    rest = ~np.isin(samp, top)
    ids = np.concatenate([top, samp[rest]])
    lp = np.concatenate([ref["top_logits"][i], ref["sample_logits"][i][rest]]).astype(np.float64) - float(ref["lse"][i])
    lq = ours.astype(np.float64).reshape(-1)
    lq = lq - (lq.max() + np.log(np.exp(lq - lq.max()).sum()))
    d = lp - lq[ids]
    wt = np.exp(lp) * np.concatenate([np.ones(len(top)), np.full(rest.sum(), (n_vocab - len(top)) / rest.sum())])
    wt /= wt.sum()
    return float(np.sum(wt * d) + np.log(np.sum(wt * np.exp(-d))))


def router_margin(eng) -> list:
    """Install a probe on every MoE block of ``eng``'s model; returns a list that collects, per routing call,
    the smallest gap between the k-th and the (k+1)-th router logit over its tokens."""
    gaps = []
    for L in eng.model.layers:
        moe = getattr(L.mlp, "f", L.mlp)

        def route(x, moe=moe, orig=moe.route):
            logits = np.sort(moe.router(x), axis=1)[:, ::-1]
            k = moe.n_used
            gaps.append(float((logits[:, k - 1] - logits[:, k]).min()))
            return orig(x)
        moe.route = route
    return gaps


ROUTER_TIE = 0.002      # a router-logit gap under this at the top-k boundary: the expert choice is a coin toss


@pytest.fixture(scope="module", params=[(a, t) for a in FAMILIES for t in ["F16", *QUANT]] + [(SHEXP, "F16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, moe_dir):
    arch, typ = request.param
    eng = Engine(model_file(moe_dir, arch, typ), n_ctx=1024, n_batch=512, n_threads=2)
    return arch, typ, eng, reference(f"{arch}-{typ}")


def test_prompt_tokens(case):
    arch, typ, eng, (rows, _) = case
    for r in rows[:-1]:
        assert eng.tokenizer.encode(r["prompt"], special=True) == r["prompt_ids"], (arch, r["prompt"])


def test_first_step_kl(case):
    """A short prompt where some token's router has a near tie at the top-k boundary (gap < ROUTER_TIE:
    llama.cpp's rounding may choose the other expert, and the logits then differ by far more than the
    bound) is left out of the mean, as a near tie of the top-2 logits is left out of the argmax check; at
    least three of the four count. The 900-token prompt always counts: one flipped choice among its
    3600 is diluted by the rest."""
    arch, typ, eng, (rows, ref) = case
    gaps = router_margin(eng)
    kls, tie = [], []
    for i, r in enumerate(rows):
        eng.reset()
        gaps.clear()
        ours = eng.ingest_prompt(r["prompt_ids"])
        kls.append(kl_estimate(ref, i, ours))
        tie.append(min(gaps) < ROUTER_TIE)
        top2 = ref["top_logits"][i][:2]
        if top2[0] - top2[1] >= 0.5 and not tie[-1]:
            assert int(np.argmax(ours)) == int(ref["top_ids"][i][0]), f"{arch} {typ} prompt {i}: argmax differs"
    short = [k for k, t in zip(kls[:-1], tie) if not t]
    print(f"{arch} {typ}: short mean KL {np.mean(short):.2e} ({len(short)} prompts), 900 tokens {kls[-1]:.2e}")
    short_bound, long_bound = (1e-4, 1e-3) if typ == "F16" else (0.02, 0.02)
    assert len(short) >= 3, (kls, tie)
    assert np.mean(short) <= short_bound, (kls, tie)
    assert kls[-1] <= long_bound, kls


@pytest.fixture(scope="module", params=FAMILIES)       # (SHEXP: every prompt's first step is a near tie)
def f16_case(request, moe_dir):
    arch = request.param
    eng = Engine(model_file(moe_dir, arch, "F16"), n_ctx=256, n_threads=2)
    return arch, eng, reference(f"{arch}-F16")


def test_greedy_f16(f16_case):
    """F16 only: on these random-weight files a quantized model's small differences from llama.cpp's
    (first-step KL ~3e-3) grow over 32 steps into different ids without a near tie (as ../shared/reference
    notes for the dense synthetic files); the quantized types are held to the first step's KL and argmax."""
    arch, eng, (rows, _) = f16_case
    check_greedy(f"{arch} F16", eng, rows[:-1])


# -- the block ----------------------------------------------------------------------------------------

def test_what_each_family_built(moe_dir):
    """The hyper-parameters that make each family differ were read (a wrong reading would still load)."""
    m = {a: load_model(GGUFFile(moe_dir / f"synthetic-{a}-F16.gguf")) for a in FAMILIES}
    assert [m[a].layers[0].mlp.norm_w if a != "granitemoe" else m[a].layers[0].mlp.f.norm_w for a in FAMILIES] \
        == [True, False, True, False]
    assert m["qwen3moe"].layers[0].attn.q_norm.size == 128                   # per head
    assert m["olmoe"].layers[0].attn.wqkv.q_norm.size == 256                 # over the whole projection
    g = m["granitemoe"]
    assert (g.embd_scale, g.residual_scale, g.logit_scale) == (12.0, pytest.approx(0.22), 6.0)
    assert g.layers[0].attn.scale == np.float32(0.015625) and not g.layers[0].attn.rope.neox
    q2 = m["qwen2moe"].layers[0].mlp
    assert q2.shared is not None and q2.shared.n_ff == 384 and q2.shared_gate.shape == (256,)
    assert all(x.experts.n_expert == 8 and x.experts.n_expert_used == 2 for x in m.values())
    gs = load_model(GGUFFile(moe_dir / f"synthetic-{SHEXP}-F16.gguf")).layers[0].mlp.f
    assert gs.shared is not None and gs.shared.n_ff == 384 and gs.shared_gate is None
    assert g.layers[0].mlp.f.shared is None


def test_experts_stay_in_the_file_until_chosen(moe_dir, monkeypatch):
    """Loading prepares no expert; a decode step prepares (reads) only the chosen ones (the Python loop's
    path); the one-call decode step runs on views of the file, no copy, and gives the same output."""
    from tinyinfer.models import moe as M
    m = load_model(GGUFFile(moe_dir / "synthetic-qwen3moe-F16.gguf"))
    blocks = [L.mlp for L in m.layers]
    assert sum(b.gate.n_prepared + b.up.n_prepared + b.down.n_prepared for b in blocks) == 0
    x = np.random.default_rng(5).standard_normal((1, m.n_embd)).astype(np.float32)
    one = blocks[0](x)
    arrays = blocks[0]._dec[1]
    assert all(np.shares_memory(a, ex.t.data) for a, ex in zip(arrays[::2], (blocks[0].gate, blocks[0].up,
                                                                             blocks[0].down)))
    monkeypatch.setattr(M, "DECODE_ONE_CALL", False)
    np.testing.assert_allclose(blocks[0](x), one, rtol=1e-6, atol=1e-6)
    for b in blocks:
        b.gate._w = [None] * b.gate.n_expert
    c = m.new_cache(16, 4)
    m.forward(np.array([1000]), 0, c)
    assert [b.gate.n_prepared for b in blocks] == [2] * len(blocks)
    for b in blocks:        # the prepared weights are views into the file's mapping, not copies
        e = next(i for i, w in enumerate(b.gate._w) if w is not None)
        assert np.shares_memory(b.gate[e].w, b.gate.t.data)


def test_batch_grouped_by_expert_equals_token_by_token(moe_dir):
    """A prompt batch (grouped by expert) gives each token the MoE output it gets alone (to the matmul
    kernels' own GEMM-vs-GEMV rounding, ~1e-5 here)."""
    m = load_model(GGUFFile(moe_dir / "synthetic-qwen2moe-F16.gguf"))
    moe = m.layers[1].mlp
    x = np.random.default_rng(0).standard_normal((37, m.n_embd)).astype(np.float32)
    chosen, _ = moe.route(x)
    assert len(np.unique(chosen)) > 2
    batch = moe(x)
    one = np.concatenate([moe(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(batch, one, rtol=1e-4, atol=1e-4)     # the kernels: GEMM vs GEMV rounding


def test_pack_budget_bounds_the_copies(moe_dir, monkeypatch):
    """Past the packed-copy budget a batch's experts run token by token on the file's layout: same result,
    no copy made; within it, one stacked copy of the layer's experts, run in one jitted call."""
    from tinyinfer.models import moe as M
    m = load_model(GGUFFile(model_file(moe_dir, "olmoe", "Q8_0")))
    blk = m.layers[2].mlp
    x = np.random.default_rng(2).standard_normal((9, m.n_embd)).astype(np.float32)
    monkeypatch.setattr(M, "PACK_BUDGET", 0)
    capped = blk(x)
    assert blk.stacked is None
    assert blk.gate.n_batched == blk.up.n_batched == blk.down.n_batched == 0
    blk._stack_tried = False
    monkeypatch.setattr(M, "PACK_BUDGET", 1 << 40)
    np.testing.assert_allclose(blk(x), capped, rtol=1e-4, atol=1e-4)
    ga = blk.stacked[1][0]
    assert ga.shape[0] == blk.gate.n_expert and not np.shares_memory(ga, blk.gate.t.data)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_one_call_batch_equals_expert_loop(moe_dir, arch):
    """The jitted block over the stacked experts (gate|up in one matrix, Q4_K_M's mixed down types) gives
    what the per-expert Python loop over the same kernels gives, with one and two threads."""
    import numba
    m = load_model(GGUFFile(model_file(moe_dir, arch, "Q4_K_M")))
    x = np.random.default_rng(3).standard_normal((40, m.n_embd)).astype(np.float32)
    types = set()
    for L in m.layers:
        blk = L.mlp
        fast = blk(x)
        assert blk.stacked is not None
        types.add(blk.down.ggml_type)
        saved, blk.stacked = blk.stacked, None
        slow = blk(x)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
        blk.stacked = saved
        if numba.config.NUMBA_NUM_THREADS > 1:
            old = numba.get_num_threads()
            numba.set_num_threads(2)
            try:
                np.testing.assert_allclose(blk(x), fast, rtol=1e-6, atol=1e-6)
            finally:
                numba.set_num_threads(old)
    assert len(types) == 2          # Q4_K_M: ffn_down_exps in Q4_K on some layers, Q6_K on others


def test_block_same_floats_at_one_and_two_threads(moe_dir):
    """Each chosen expert runs whole on one thread (the threads share out experts, never an expert's rows),
    and the slots are summed in one order: a decode step on the file's layout, a grouped batch and a decode
    step on the stacked copy give the same floats at one and two threads."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here (NUMBA_NUM_THREADS)")
    blk = load_model(GGUFFile(model_file(moe_dir, "qwen3moe", "Q4_K_M"))).layers[0].mlp
    rng = np.random.default_rng(8)
    one, batch = (rng.standard_normal((n, blk.gate.k)).astype(np.float32) for n in (1, 24))

    def both(x):
        old = numba.get_num_threads()
        try:
            outs = []
            for nt in (1, 2):
                numba.set_num_threads(nt)
                outs.append(blk(x))
        finally:
            numba.set_num_threads(old)
        np.testing.assert_array_equal(outs[0], outs[1])

    both(one)
    assert blk.stacked is None          # the file's layout
    both(batch)
    assert blk.stacked is not None
    both(one)


def test_small_batches_copy_no_expert_and_use_the_stacked_layer(moe_dir):
    """A group of fewer than PACK_MIN_ROWS rows (an engine's 2-token warm-up: both tokens choose the same
    experts) copies no expert; once a layer is stacked, small batches and decode steps run on the stacked
    copy in one call too (no per-expert copies on top of it), with the file layout's outputs."""
    m = load_model(GGUFFile(model_file(moe_dir, "qwen3moe", "Q4_K_M")))
    blk = m.layers[1].mlp
    x = np.repeat(np.random.default_rng(4).standard_normal((1, m.n_embd)).astype(np.float32), 2, axis=0)
    one = blk(x[:1])
    np.testing.assert_allclose(blk(x), np.concatenate([one, one]), rtol=1e-6, atol=1e-6)
    assert blk.gate.n_batched == blk.up.n_batched == blk.down.n_batched == 0 and blk.stacked is None
    big = np.random.default_rng(6).standard_normal((8, m.n_embd)).astype(np.float32)
    blk(big)                                   # 8 tokens x 2 slots >= 8 experts: the layer is stacked
    assert blk.stacked is not None
    pair = big[:3]
    calls = []
    drive, arrays = blk.stacked
    blk.stacked = (lambda *a: calls.append(1) or drive(*a), arrays)
    got = blk(pair)
    assert calls and blk.gate.n_batched == 0
    calls.clear()
    singles = np.concatenate([blk(pair[i:i + 1]) for i in range(3)])
    assert len(calls) == 3          # decode steps too run on the stacked copy
    np.testing.assert_allclose(got, singles, rtol=1e-4, atol=1e-4)
    fresh = load_model(GGUFFile(model_file(moe_dir, "qwen3moe", "Q4_K_M"))).layers[1].mlp
    np.testing.assert_allclose(singles, np.concatenate([fresh(pair[i:i + 1]) for i in range(3)]), rtol=1e-4,
                               atol=1e-4)      # = the decode step on the file's layout (GEMV rounding)
    assert fresh.stacked is None


def test_output_copy_made_on_first_batch(moe_dir):
    """The output projection: where one row of logits runs on the tensor's own blocks (x86 K-quants), those
    are copied out of the mapping and the GEMM layout's copy is made on the first call with several rows,
    not at load; the logits are those of a projection prepared at load either way."""
    from tinyinfer.kernels import matmul as mm
    from tinyinfer.models.base import Linear
    g = GGUFFile(model_file(moe_dir, "qwen3moe", "Q4_K_M"))
    m = load_model(g)
    ref = Linear(g.tensors["token_embd.weight"])
    lazy = ref.w.packed is not None and mm._plan(ref.w, 1)[0] is False
    assert (m.output.w.packed is None) == lazy
    assert np.shares_memory(m.output.w.w, g.tensors["token_embd.weight"].data) == (not lazy)
    x = np.random.default_rng(7).standard_normal((3, m.n_embd)).astype(np.float32)
    np.testing.assert_array_equal(m.output(x[:1]), ref(x[:1]))
    assert (m.output.w.packed is None) == lazy
    np.testing.assert_array_equal(m.output(x), ref(x))
    assert (m.output.w.packed is None) == (ref.w.packed is None)


MOE_KERNELS = """
import sys
import numpy as np
from tinyinfer.gguf import GGUFFile
from tinyinfer.kernels import moe as kmoe
from tinyinfer.models import load_model
m = load_model(GGUFFile(sys.argv[1]))
x = np.random.default_rng(0).standard_normal((8, m.n_embd)).astype(np.float32)
for L in m.layers:
    L.mlp(x)
    L.mlp(x[:1])
ds = list(kmoe._DRIVERS.values())
print(len(ds), sum(sum(d.stats.cache_hits.values()) for d in ds), sum(sum(d.stats.cache_misses.values()) for d in ds))
"""


def test_moe_kernels_load_from_numbas_cache(moe_dir):
    """kernels/moe.py's jitted blocks (closures over the matmul drivers) are loaded from numba's on-disk
    cache by the next process, not compiled again."""
    path = model_file(moe_dir, "qwen3moe", "Q4_K_M")
    for run in range(2):       # the first may compile (a fresh checkout); the second must load all
        r = subprocess.run([sys.executable, "-c", MOE_KERNELS, str(path)], capture_output=True, text=True,
                           cwd=ROOT, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    n, hits, misses = map(int, r.stdout.split()[-3:])
    assert n >= 2 and hits == n and misses == 0, r.stdout


def test_route_against_numpy(moe_dir):
    """softmax, top-k and the renormalisation, from the router logits with numpy alone."""
    m = load_model(GGUFFile(moe_dir / "synthetic-qwen3moe-F16.gguf"))
    moe = m.layers[0].mlp
    x = np.random.default_rng(1).standard_normal((5, m.n_embd)).astype(np.float32)
    w_router = moe.router.w.w.view(np.float32).reshape(8, -1)
    logits = x.astype(np.float64) @ w_router.T.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, 1)[:, :2]
    chosen, w = moe.route(x)
    np.testing.assert_array_equal(chosen, top)
    want = np.take_along_axis(p, top, 1)
    np.testing.assert_allclose(w, want / want.sum(1, keepdims=True), rtol=1e-5)


# -- refusals -----------------------------------------------------------------------------------------

def _with_key(src: Path, dst: Path, key: str, value: int) -> Path:
    """A copy of a GGUF with one uint32 metadata value changed in place (GGUF: u64 key length, key, u32 type,
    value)."""
    shutil.copyfile(src, dst)
    name = key.encode()
    with open(dst, "r+b") as f:
        head = f.read(1 << 25)         # the metadata (a vocabulary of 128k tokens and merges: ~5 MB)
        at = head.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        assert struct.unpack_from("<I", head, at)[0] == 4, "not a uint32 key"       # GGUF_TYPE_UINT32
        f.seek(at + 4)
        f.write(struct.pack("<I", value))
    return dst


def test_wrong_expert_count_refused(moe_dir, tmp_path):
    bad = _with_key(moe_dir / "synthetic-olmoe-F16.gguf", tmp_path / "six.gguf", "olmoe.expert_count", 6)
    with pytest.raises(ModelError) as e:
        load_model(GGUFFile(bad))
    msg = str(e.value)
    assert "\n" not in msg and "ffn_gate_inp.weight" in msg and "256x8" in msg and "256x6" in msg, msg


def test_used_count_beyond_expert_count_refused(moe_dir, tmp_path):
    bad = _with_key(moe_dir / "synthetic-olmoe-F16.gguf", tmp_path / "nine.gguf", "olmoe.expert_used_count", 9)
    with pytest.raises(ModelError, match=r"expert_used_count \(9\) must be in 1\.\.olmoe\.expert_count \(8\)"):
        load_model(GGUFFile(bad))


def test_truncated_expert_tensor_refused(moe_dir, tmp_path):
    """A file cut inside the last expert tensor is refused at open, naming that tensor, in one line."""
    from tinyinfer.gguf import GGUFError
    src = moe_dir / "synthetic-qwen3moe-F16.gguf"
    g = GGUFFile(src)
    last = max(g.tensors.values(), key=lambda t: t.offset)
    assert last.name.endswith("_exps.weight")
    cut = tmp_path / "cut.gguf"
    size = src.stat().st_size - last.nbytes // 2
    with open(src, "rb") as f, open(cut, "wb") as o:
        o.write(f.read(size))
    with pytest.raises((GGUFError, ModelError)) as e:
        load_model(GGUFFile(cut))
    assert last.name in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- the faces and tools ------------------------------------------------------------------------------

def test_inspect_counts_active_parameters(moe_dir):
    """Active parameters: everything but the experts, plus expert_used_count / expert_count of them
    (4 layers x 3 tensors x 8 experts x 256 x 256 here); bytes read per token likewise."""
    from tinyinfer.tools.inspect import analyze, render
    g = GGUFFile(moe_dir / "synthetic-olmoe-F16.gguf")
    info = analyze(g)
    ts = info["tensors"]
    experts = 4 * 3 * 8 * 256 * 256
    assert ts["moe"]["active_params"] == ts["params"] - experts * 6 // 8
    emb = g.tensors["token_embd.weight"]
    assert ts["moe"]["bytes_per_token"] == ts["bytes"] - experts * 2 * 6 // 8 - emb.nbytes + 2 * 256   # one F16 row
    assert "2 of 8 experts per token" in render(info)


def test_llama_class_perplexity_and_bench_take_moe(moe_dir, tmp_path, capfd):
    """The Llama class answers llama.cpp's greedy tokens; perplexity and bench run the file."""
    from tinyinfer.api import Llama
    from tinyinfer.tools import bench, perplexity
    path = moe_dir / "synthetic-qwen3moe-F16.gguf"
    rows, _ = reference("qwen3moe-F16")
    llm = Llama(str(path), n_ctx=256, verbose=False)
    out = llm.create_completion(rows[0]["prompt_ids"], max_tokens=3, temperature=0)
    first = llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)[:1]
    assert first == rows[0]["greedy_ids"][:1]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 12))
    ppl, _, _ = perplexity.perplexity(Engine(path, n_ctx=64), text.read_text(), n_ctx=64, n_chunks=1,
                                      out=io.StringIO(), progress=False)
    assert np.isfinite(ppl) and ppl > 1
    assert bench.main(["-m", str(path), "-p", "16", "-n", "4", "-r", "1", "-t", "1"]) == 0
    assert "qwen3moe" in capfd.readouterr().out


def test_server_takes_moe(moe_dir, tmp_path):
    """The real server on loopback: /v1/completions' greedy text is llama.cpp's tokens."""
    httpx = pytest.importorskip("httpx")
    import socket
    import time
    rows, _ = reference("qwen2moe-F16")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "wb")
    model = moe_dir / "synthetic-qwen2moe-F16.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "tinyinfer", "serve", "-m", str(model), "--port", str(port),
                             "-c", "256"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        from tinyinfer.tokenizer import Tokenizer
        tok = Tokenizer.from_gguf(GGUFFile(moe_dir / "synthetic-qwen2moe-F16.gguf").metadata)
        r = rows[0]
        got = httpx.post(url + "/v1/completions", timeout=120, json={
            "prompt": r["prompt_ids"], "max_tokens": 3, "temperature": 0}).json()
        assert got["choices"][0]["text"] == tok.decode(r["greedy_ids"][:3]), got
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
