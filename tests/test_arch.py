"""The architectures beyond llama/gemma3 against llama.cpp: Qwen2.5 (a real qwen2 file) and the synthetic
qwen3 / Llama 3 (rope_freqs) / phi3 / smollm3 files; the layer-split pieces; load-time errors.

Bounds from ../shared/reference/README.md: Qwen2.5 Q4_K_M mean first-step KL <= 0.01, the synthetic F16
files <= 1e-4; the same argmax where the reference's top-2 gap >= 0.5; greedy ids equal until the first
near tie. The synthetic files are written by ../shared/tools/make_arch_models.py into the model cache
and checked against ../shared/reference/arch/sha256.txt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import REFERENCE, ROOT, cache_lock, need_reference
from test_inference import check_first_step, check_greedy
from tinyinfer.engine import Engine
from tinyinfer.fetch import _sha256, cache_dir
from tinyinfer.gguf import GGUFFile
from tinyinfer.models import ModelError, load_model

SYNTHETIC = ["qwen3", "llama3", "phi3", "smollm3"]


@pytest.fixture(scope="session")
def synthetic_dir():
    """The four synthetic files, generated once into the model cache (sha256 checked every session)."""
    tool = REFERENCE.parent / "tools" / "make_arch_models.py"
    want = dict(reversed(line.split()) for line in need_reference("arch", "sha256.txt").read_text().splitlines()
                if line.strip())
    if not tool.exists():
        need_reference("..", "tools", "make_arch_models.py")
    out = cache_dir() / "synthetic"
    with cache_lock():
        missing = [a for a in SYNTHETIC if not (out / f"synthetic-{a}-F16.gguf").exists()
                   or _sha256(out / f"synthetic-{a}-F16.gguf") != want[f"synthetic-{a}-F16.gguf"]]
        if missing:
            subprocess.run([sys.executable, str(tool), str(REFERENCE / "vocab"), str(out), *missing], check=True,
                           stdout=subprocess.DEVNULL)
            for a in missing:
                name = f"synthetic-{a}-F16.gguf"
                assert _sha256(out / name) == want[name], f"{name}: not the bytes llama.cpp's outputs were made from"
    return out


def _reference(folder, tag):
    refs = [json.loads(line) for line in open(need_reference(folder, f"greedy_{tag}.jsonl"))]
    logits = np.fromfile(need_reference(folder, f"first_logits_{tag}.f32"), np.float32).reshape(len(refs), -1)
    return refs, logits


# -- Qwen2.5-Coder-0.5B-Instruct Q4_K_M (a real qwen2 file) ------------------------------------

@pytest.fixture(scope="module")
def qwen(qwen25_path):
    return Engine(qwen25_path, n_ctx=256, n_threads=2)


@pytest.fixture(scope="module")
def qwen_ref():
    return _reference("qwen2", "Q4_K_M")


def test_qwen2_prompt_tokens(qwen, qwen_ref):
    assert qwen.tokenizer.add_bos is False
    for r in qwen_ref[0]:
        assert qwen.tokenizer.encode(r["prompt"], special=True) == r["prompt_ids"], r["prompt"]


def test_qwen2_first_step_logits(qwen, qwen_ref):
    check_first_step("qwen2 Q4_K_M", qwen, *qwen_ref, bound=0.01)


def test_qwen2_greedy(qwen, qwen_ref):
    check_greedy("qwen2 Q4_K_M", qwen, qwen_ref[0])


# -- synthetic F16 files ----------------------------------------------------------------------

@pytest.fixture(scope="module", params=SYNTHETIC)
def synthetic(request, synthetic_dir):
    arch = request.param
    eng = Engine(synthetic_dir / f"synthetic-{arch}-F16.gguf", n_ctx=4096, n_batch=64, n_threads=2)
    return arch, eng, _reference("arch", f"{arch}-F16")


def test_synthetic_prompt_tokens(synthetic):
    """llama-bpe (Llama 3, SmolLM3), qwen2 (Qwen3) and Phi-3's SentencePiece tokenize the prompts as llama.cpp."""
    arch, eng, (refs, _) = synthetic
    for r in refs:
        assert eng.tokenizer.encode(r["prompt"], special=True) == r["prompt_ids"], (arch, r["prompt"])


def test_synthetic_first_step_logits(synthetic):
    arch, eng, ref = synthetic
    check_first_step(f"{arch} F16", eng, *ref, bound=1e-4)


def test_synthetic_greedy(synthetic):
    arch, eng, ref = synthetic
    check_greedy(f"{arch} F16", eng, ref[0])


def test_synthetic_architecture_specifics(synthetic_dir):
    """What each file exercises is what the model built: a wrong reading would still load."""
    m = {a: load_model(GGUFFile(synthetic_dir / f"synthetic-{a}-F16.gguf")) for a in SYNTHETIC}
    assert m["qwen3"].hp.head_dim_k == 128 != m["qwen3"].n_embd // m["qwen3"].hp.n_head
    assert m["qwen3"].layers[0].attn.q_norm.size == 128 and m["qwen3"].layers[0].attn.rope.neox
    assert m["llama3"].freq_factors is not None and all(L.attn.rope.factors for L in m["llama3"].layers)
    assert [L.attn.rope.n_rot for L in m["smollm3"].layers] == [64, 64, 64, 0]
    phi = m["phi3"]
    assert phi.rope_factors(4096) is phi.factors_short and phi.rope_factors(4097) is phi.factors_long


def test_phi3_long_factors_change_the_result(synthetic_dir):
    """A context beyond rope.scaling.original_context_length switches phi3 to its long factors (llama.cpp)."""
    m = load_model(GGUFFile(synthetic_dir / "synthetic-phi3-F16.gguf"))
    ids = np.arange(100, 140)
    short = m.forward(ids, 0, m.new_cache(4096, 64))
    long_ = m.forward(ids, 0, m.new_cache(8192, 64))
    assert not np.allclose(short, long_, atol=1e-2)


# -- the layer-split pieces -------------------------------------------------------------------

def test_forward_in_layer_ranges_equals_forward(synthetic_dir):
    """embed / forward_layers(lo, hi) / head, with a cache per range, give forward's logits (a split by layers)."""
    m = load_model(GGUFFile(synthetic_dir / "synthetic-smollm3-F16.gguf"))
    ids = np.arange(1000, 1012)
    whole = m.forward(ids, 0, m.new_cache(64, 16), n_out=3)
    parts = [(0, 1), (1, 3), (3, 4)]
    caches = [m.new_cache(64, 16, lo, hi) for lo, hi in parts]
    assert [len(c.k) for c in caches] == [1, 2, 1]
    x = m.embed(ids)
    for (lo, hi), c in zip(parts, caches):
        x = m.forward_layers(x, 0, c, lo, hi)
    np.testing.assert_array_equal(m.head(x, 3), whole)
    # and a decode step continues each range's cache
    x = m.embed(np.array([7]))
    for (lo, hi), c in zip(parts, caches):
        x = m.forward_layers(x, len(ids), c, lo, hi)
    full = m.new_cache(64, 16)
    m.forward(ids, 0, full)
    np.testing.assert_array_equal(m.head(x), m.forward(np.array([7]), len(ids), full))


# -- bad input: one line naming the key or tensor -----------------------------------------------

@pytest.fixture()
def llama3_file(synthetic_dir):
    return GGUFFile(synthetic_dir / "synthetic-llama3-F16.gguf")


def _one_line_error(g, match):
    with pytest.raises(ModelError, match=match) as e:
        load_model(g)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["blk.2.attn_k.weight", "output_norm.weight", "token_embd.weight",
                                  "blk.3.ffn_down.weight"])
def test_missing_tensor_is_named(llama3_file, name):
    del llama3_file.tensors[name]
    _one_line_error(llama3_file, rf"missing tensor '{name}'")


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                                 "llama.feed_forward_length"])
def test_missing_key_is_named(llama3_file, key):
    del llama3_file.metadata[key]
    _one_line_error(llama3_file, rf"missing metadata key '{key}'")


@pytest.mark.parametrize("name", ["blk.1.attn_q.weight", "blk.0.ffn_gate.weight", "blk.2.attn_norm.weight",
                                  "rope_freqs.weight"])
def test_wrong_shape_is_named(llama3_file, name):
    t = llama3_file.tensors[name]
    llama3_file.tensors[name] = replace(t, shape=(t.shape[0] // 2,) + t.shape[1:])
    _one_line_error(llama3_file, rf"tensor '{name}' has shape")


def test_unused_rope_freqs_is_an_error(synthetic_dir, llama3_file):
    """A qwen3 file carrying rope_freqs.weight would change the math if honoured: refuse it, don't ignore it."""
    g = GGUFFile(synthetic_dir / "synthetic-qwen3-F16.gguf")
    g.tensors["rope_freqs.weight"] = replace(llama3_file.tensors["rope_freqs.weight"])
    _one_line_error(g, r"tensor 'rope_freqs.weight' is not used by the qwen3 architecture")


def test_phi3_without_fused_qkv_is_named(synthetic_dir):
    g = GGUFFile(synthetic_dir / "synthetic-phi3-F16.gguf")
    del g.tensors["blk.0.attn_qkv.weight"]
    _one_line_error(g, r"missing tensor 'blk.0.attn_qkv.weight'")


# -- inspect: the KV cache it reports is the one the model allocates -----------------------------

def test_inspect_kv_size_is_the_models_cache(capsys, synthetic_dir, qwen25_path):
    import json as _json
    from tinyinfer.tools.inspect import main as inspect_main, swa_layers
    files = [qwen25_path] + [synthetic_dir / f"synthetic-{a}-F16.gguf" for a in SYNTHETIC]
    for f in files:
        assert inspect_main([str(f), "--json", "-c", "1024", "-b", "256"]) == 0
        j = _json.loads(capsys.readouterr().out)
        m = load_model(GGUFFile(f))
        assert j["general"]["architecture"] == m.arch
        assert j["memory"]["kv_bytes"] == m.new_cache(1024, 256).nbytes, f
        assert j["memory"]["verdict"] in ("fits", "does not fit")
    assert j["hparams"]["derived"]["n_embd_head_k"] == 64
    # phi3: llama.cpp ignores the sliding window (Phi-3-mini files carry 2047): full attention everywhere
    swa, note = swa_layers("phi3", 32, 2047, None)
    assert not any(swa) and "ignored" in note


@pytest.mark.parametrize("key,value,match", [
    ("llama.rope.dimension_count", 96, r"rope.dimension_count \(96\) must be even and at most the head dim \(64\)"),
    ("llama.attention.head_count_kv", 3, r"head_count \(4\) is not a multiple of head_count_kv \(3\)"),
])
def test_bad_hparams_are_named(llama3_file, key, value, match):
    llama3_file.metadata[key] = value
    _one_line_error(llama3_file, match)


def test_cli_refuses_a_real_file_missing_a_tensor(tmp_path):
    """A real phi3 file written without blk.1.attn_qkv.weight (the generator with that tensor left out):
    the CLI says so in one line and exits 1."""
    tool = need_reference("..", "tools", "make_arch_models.py")
    out = tmp_path / "phi3-missing.gguf"
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('mam', {str(tool)!r})\n"
        "mam = importlib.util.module_from_spec(spec); spec.loader.exec_module(mam)\n"
        "orig = mam.gguf.GGUFWriter.add_tensor\n"
        "def add_tensor(self, name, *a, **k):\n"
        "    if name != 'blk.1.attn_qkv.weight':\n"
        "        return orig(self, name, *a, **k)\n"
        "mam.gguf.GGUFWriter.add_tensor = add_tensor\n"
        f"mam.build('phi3', {str(REFERENCE / 'vocab')!r}, {str(out)!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    p = subprocess.run([sys.executable, "-m", "tinyinfer", "-m", str(out), "-p", "Hi", "-n", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "missing tensor 'blk.1.attn_qkv.weight'" in err[0], p.stderr
