"""End-to-end against llama.cpp: SmolLM2 in Q4_1 (as shipped), Q4_0, Q8_0 and F16 (requantized by us).

Bounds from ../shared/reference/README.md: mean first-step KL(ref || ours) <= 0.01
(<= 1e-4 for F16), the same argmax where the reference's top-2 gap >= 0.5, greedy tokens
equal until the first near tie.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cache_lock, need_reference
from tinyinfer.engine import Engine
from tinyinfer.sampler import SamplerParams
from tinyinfer.tools.perplexity import kl_divergence as kl

TYPES = ["Q4_1", "Q4_0", "Q8_0", "F16"]
KL_BOUND = {"Q4_1": 0.01, "Q4_0": 0.01, "Q8_0": 0.01, "F16": 1e-4}


def model_path(typ, smollm2_path):
    if typ == "Q4_1":
        return smollm2_path
    from tinyinfer.tools.quantize import ensure_requantized
    with cache_lock():
        return ensure_requantized(typ)


@pytest.fixture(scope="module", params=TYPES)
def case(request, smollm2_path):
    typ = request.param
    refs = [json.loads(line) for line in open(need_reference("smollm2", f"greedy_{typ}.jsonl"))]
    logits = np.fromfile(need_reference("smollm2", f"first_logits_{typ}.f32"), np.float32).reshape(len(refs), -1)
    eng = Engine(model_path(typ, smollm2_path), n_ctx=256, n_threads=2)
    return typ, eng, refs, logits


def test_prompt_tokens_match_llama_cpp(case):
    typ, eng, refs, _ = case
    for r in refs:
        prompt = r["prompt"]
        assert eng.tokenizer.encode(prompt, special=True) == r["prompt_ids"], prompt


def check_first_step(name, eng, refs, ref_logits, bound):
    """Mean KL(ref || ours) within bound; the same argmax wherever the reference's top-2 gap >= 0.5."""
    kls = []
    for i, r in enumerate(refs):
        eng.reset()
        ours = eng.ingest_prompt(r["prompt_ids"])
        kls.append(kl(ref_logits[i], ours))
        top2 = np.sort(ref_logits[i])[-2:]
        if top2[1] - top2[0] >= 0.5:
            assert int(np.argmax(ours)) == int(np.argmax(ref_logits[i])), f"prompt {i}: argmax differs"
    print(f"{name}: mean KL {np.mean(kls):.2e}, max {np.max(kls):.2e}")
    assert np.mean(kls) <= bound, kls


def check_greedy(name, eng, refs) -> int:
    """Greedy tokens equal llama.cpp's until the first step whose top-2 gap is under 0.5. Returns the
    number of tokens compared; none at all (every prompt starts with a near tie) is a failure, not a pass."""
    checked = 0
    for r in refs:
        eng.reset()
        ours = [s.token for s in eng.generate(r["prompt_ids"], SamplerParams(temperature=0.0),
                                             max_tokens=len(r["greedy_ids"]), ignore_eos=True)]
        for step, (want, top5) in enumerate(zip(r["greedy_ids"], r["top5"])):
            if top5[0][1] - top5[1][1] < 0.5:
                break
            assert step < len(ours) and ours[step] == want, (
                f"{name} prompt {r['prompt']!r}: step {step} got {ours[step:step + 1]}, llama.cpp {want}")
            checked += 1
    assert checked > 0, f"{name}: every reference prompt starts with a near tie: nothing was compared"
    return checked


def test_first_step_logits(case):
    typ, eng, refs, ref_logits = case
    check_first_step(typ, eng, refs, ref_logits, KL_BOUND[typ])


def test_greedy_tokens_until_first_near_tie(case):
    typ, eng, refs, _ = case
    check_greedy(typ, eng, refs)
