"""Gemma 3 270M Q4_K_M against llama.cpp; sliding-window cache; unsupported architectures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import need_reference
from tinyinfer.engine import Engine
from tinyinfer.gguf import GGUFFile
from tinyinfer.models import ModelError, load_model
from tinyinfer.sampler import SamplerParams
from test_inference import kl


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return Engine(gemma3_path, n_ctx=256, n_threads=2)


@pytest.fixture(scope="module")
def reference():
    refs = [json.loads(line) for line in open(need_reference("gemma3", "greedy_Q4_K_M.jsonl"))]
    logits = np.fromfile(need_reference("gemma3", "first_logits_Q4_K_M.f32"), np.float32).reshape(len(refs), -1)
    return refs, logits


def test_prompt_tokens(gemma, reference):
    for r in reference[0]:
        assert gemma.tokenizer.encode(r["prompt"], special=True) == r["prompt_ids"]


def test_first_step_logits(gemma, reference):
    refs, ref_logits = reference
    kls = []
    for i, r in enumerate(refs):
        gemma.reset()
        ours = gemma.ingest_prompt(r["prompt_ids"])
        kls.append(kl(ref_logits[i], ours))
        top2 = np.sort(ref_logits[i])[-2:]
        if top2[1] - top2[0] >= 0.5:
            assert int(np.argmax(ours)) == int(np.argmax(ref_logits[i]))
    print(f"gemma3 Q4_K_M: mean KL {np.mean(kls):.2e}, max {np.max(kls):.2e}")
    assert np.mean(kls) <= 0.01, kls


def test_greedy(gemma, reference):
    for r in reference[0]:
        gemma.reset()
        ours = [s.token for s in gemma.generate(r["prompt_ids"], SamplerParams(temperature=0.0),
                                               max_tokens=len(r["greedy_ids"]))]
        for step, (want, top5) in enumerate(zip(r["greedy_ids"], r["top5"])):
            if top5[0][1] - top5[1][1] < 0.5:
                break
            assert ours[step] == want, f"prompt {r['prompt']!r} step {step}"


def test_sliding_window_ring_matches_full_cache(gemma3_path):
    """Local layers keep only window + n_batch rows; with a small window the ring must give the
    same logits as a cache holding every position (same window mask, no wrap-around)."""
    g = GGUFFile(gemma3_path)
    m = load_model(g)
    window = 8
    for _, attn, _ in m.layers:
        if attn.p.window:
            attn.p = replace(attn.p, window=window)
    m.windows = [window if w else 0 for w in m.windows]
    ids = np.random.default_rng(0).integers(10, 5000, size=40)
    ring = m.new_cache(64, n_batch=4)
    assert min(k.shape[0] for k in ring.k) == window + 4
    full = m.new_cache(64, n_batch=64)
    assert all(k.shape[0] == 64 for k in full.k)
    for s in range(0, 40, 4):
        a = m.forward(ids[s:s + 4], s, ring)
    b = m.forward(ids, 0, full)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_unsupported_architecture_is_named():
    g = GGUFFile(need_reference("vocab", "ggml-vocab-gpt-2.gguf"))
    with pytest.raises(ModelError, match=r"'gpt2' is not supported; supported: gemma3, llama"):
        load_model(g)
