"""Gemma 3 270M Q4_K_M against llama.cpp; sliding-window cache; unsupported architectures."""

from __future__ import annotations

import json
import numpy as np
import pytest

from conftest import need_reference
from tinyinfer.engine import Engine
from tinyinfer.gguf import GGUFFile
from tinyinfer.models import ModelError, load_model
from test_inference import check_first_step, check_greedy


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
    check_first_step("gemma3 Q4_K_M", gemma, *reference, bound=0.01)


def test_greedy(gemma, reference):
    check_greedy("gemma3 Q4_K_M", gemma, reference[0])


def test_sliding_window_ring_matches_full_cache(gemma3_path):
    """Local layers keep only window + n_batch rows; with a small window the ring must give the
    same logits as a cache holding every position (same window mask, no wrap-around)."""
    g = GGUFFile(gemma3_path)
    m = load_model(g)
    window = 8
    for L in m.layers:
        if L.attn.window:
            L.attn.window = window
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
    from tinyinfer.models import ARCHITECTURES
    with pytest.raises(ModelError, match=r"'gpt2' is not supported; supported: " + ", ".join(sorted(ARCHITECTURES))):
        load_model(g)
    assert {"gemma3", "llama", "qwen3moe", "bert"} <= set(ARCHITECTURES)
