"""The same answer under load: with ``--batch-invariant`` a sequence's greedy tokens and logprobs are
bit-identical whether it is decoded alone or with three others under ``--parallel 4``, and whether its
prompt came from the prompt cache or not (Qwen2.5-Coder Q4_K_M: Q4_K / Q6_K / Q5_0 / Q8_0 weights, whose
default kernels sum a single row and a batch's rows in different orders)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, need_module, serve_process

httpx = need_module("httpx")

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Name three colours.",
           "Explain gravity in one sentence.", "Say hello in Spanish.", "List two fruits.",
           "Why is the sky blue?", "Give a tip for sleeping well."]


@pytest.fixture(scope="module")
def invariant_server(qwen25_path):
    yield from serve_process(qwen25_path, "--parallel", "4", "-t", "1", "-c", "2048", "--batch-invariant")


def _ask(base, prompt, **extra):
    r = httpx.post(base + "/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0, "logprobs": True,
        **extra})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"], [t["logprob"] for t in c["logprobs"]["content"]]


def test_alone_and_four_at_a_time_are_bit_identical(invariant_server):
    base = invariant_server
    alone = [_ask(base, p, cache_prompt=False) for p in PROMPTS]
    with ThreadPoolExecutor(4) as ex:
        together = list(ex.map(lambda p: _ask(base, p), PROMPTS))      # cached prompts, four per batch
    assert together == alone
    again = [_ask(base, p) for p in PROMPTS[:2]]                          # the prompt cache reused alone
    assert again == alone[:2]
    assert all(len(lp) > 1 for _, lp in alone)


def test_flag_is_in_help():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "tinyinfer", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    assert "--batch-invariant" in out
