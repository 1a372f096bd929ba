"""Speculative decoding (tinyinfer/speculative.py): the proposers, and output identical to plain decoding.

Real models: SmolLM2 (target) with its Q4_0 requantization as the draft model (it disagrees with the
target now and then, so both accepted and rejected guesses are exercised), and Qwen2.5-Coder with
ngram-simple on a "rewrite this code" prompt (where lookup finds long runs).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tinyinfer.engine import Engine
from tinyinfer.sampler import SamplerParams
from tinyinfer.speculative import (DraftModel, LlamaPromptLookupDecoding, NgramSimple, SpecError, check_vocab,
                                   proposer_of)

from conftest import ROOT, cache_lock

GREEDY = SamplerParams(temperature=0.0)

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox",
]

SOURCE = """def mean(values):
    total = 0
    count = 0
    for v in values:
        total += v
        count += 1
    if count == 0:
        return 0
    return total / count


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total += (v - m) ** 2
    return total / len(values)
"""
#: a "rewrite this code" request: the answer repeats most of the code, where n-gram lookup shines
CODE = ("<|im_start|>user\nRename the function `mean` to `average` everywhere in this code. Reply with the whole "
        f"code only.\n\n```python\n{SOURCE}```<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def target(smollm2_path):
    return Engine(smollm2_path, n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def q4_0_path():
    from tinyinfer.tools.quantize import ensure_requantized
    with cache_lock():
        return ensure_requantized("Q4_0")


@pytest.fixture(scope="module")
def draft(q4_0_path):
    return DraftModel(Engine(q4_0_path, n_ctx=512, n_threads=1))


def _run(eng, ids, sampler=GREEDY, **kw):
    return [s.token for s in eng.generate(ids, sampler, **kw)]


# -- proposers ---------------------------------------------------------------------------------

def test_ngram_simple_is_llama_cpps_lookup():
    p = NgramSimple(size_n=2, size_m=3)
    #          0  1  2  3  4  5  6  7  8  9 10
    hist = [9, 1, 2, 3, 4, 5, 1, 2, 7, 8, 6, 0, 1, 2]   # pattern [1, 2]: latest earlier match at 6
    assert p.propose(hist, 16) == [7, 8, 6]
    assert p.propose(hist[:-1] + [5], 16) == []          # pattern [1, 5]: no earlier occurrence
    assert p.propose([1, 2, 3, 1, 2], 16) == []          # too short: needs more than n + m + 1 tokens
    # llama.cpp ignores a match at position 0
    assert NgramSimple(2, 1).propose([1, 2, 3, 4, 5, 1, 2], 16) == []
    with pytest.raises(SpecError, match="size_n"):
        NgramSimple(size_n=0)


def test_prompt_lookup_is_llama_cpp_pythons():
    p = LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=3)
    ids = np.array([5, 1, 2, 3, 4, 1, 2, 8, 1, 2], np.intc)
    assert list(p(ids)) == [3, 4, 1]                     # the first occurrence of the last bigram
    assert list(p(np.array([5, 6, 7, 6], np.intc))) == [7, 6]   # falls back to a unigram
    assert list(p(np.array([1, 2, 3], np.intc))) == []
    assert p.propose([5, 1, 2, 3, 4, 1, 2, 8, 1, 2], 16) == [3, 4, 1]


def test_proposer_of_rejects_what_is_not_one():
    assert proposer_of(None) is None
    assert proposer_of(lambda ids: [1]).propose([0], 4) == [1]
    with pytest.raises(TypeError, match="draft_model"):
        proposer_of(42)


# -- greedy identity, library ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ngram-simple", "prompt-lookup", "draft"])
def test_greedy_identity_smollm2(target, draft, kind):
    prop = {"ngram-simple": NgramSimple(2, 8), "prompt-lookup": LlamaPromptLookupDecoding(), "draft": draft}[kind]
    drafted = accepted = rejected = 0
    for p in PROMPTS:
        ids = target.tokenizer.encode(p, special=True)
        plain = _run(target, ids, max_tokens=48)
        assert target.timings.draft_n == 0
        spec = _run(target, ids, max_tokens=48, draft_model=prop, draft_n_max=6)
        assert spec == plain, (kind, p)
        t = target.timings
        drafted, accepted = drafted + t.draft_n, accepted + t.draft_n_accepted
        rejected += t.draft_n - t.draft_n_accepted
        assert t.n_eval < len(spec) or t.draft_n_accepted == 0      # accepted guesses saved forward passes
        # the context holds the prompt and the output (the last token may not be evaluated): no guess left
        full = ids + spec
        assert target.tokens == full[:len(target.tokens)] and len(target.tokens) >= len(full) - 1
    assert accepted > 0 and rejected > 0, (kind, drafted, accepted)


def _replay(right, n_max):
    """Greedy speculative decoding replayed from which draft guesses match the target's text: right[i - 1]
    says whether the draft's argmax after the prompt and tokens[:i] is tokens[i]. A cycle after token i - 1
    guesses tokens i.. (none for the last token asked for: the check gives it) and keeps the guesses up to
    the first wrong one. Returns (drafted, accepted, target passes after the first token)."""
    n_tok, i, drafted, accepted, passes = len(right) + 1, 1, 0, 0, 0
    while i < n_tok:
        k = min(n_max, n_tok - 1 - i)
        a = 0
        while a < k and right[i + a - 1]:
            a += 1
        drafted, accepted, passes, i = drafted + k, accepted + a, passes + 1, i + a + 1
    return drafted, accepted, passes


@pytest.mark.parametrize("n_max", [3, 8])
def test_draft_counts_are_the_teacher_forced_replays(target, draft, q4_0_path, n_max):
    """With a greedy target and draft, which guesses are drafted and accepted follows from one batched pass
    of the draft over the target's own text: the draft's cache (kept, cut back, extended) must give the
    same guesses as a fresh pass over that text, cycle after cycle."""
    from tinyinfer.kvcache import Batch
    fresh = Engine(q4_0_path, n_ctx=512, n_threads=1)
    for p in PROMPTS[:2]:
        ids = target.tokenizer.encode(p, special=True)
        toks = _run(target, ids, max_tokens=40, ignore_eos=True)
        assert _run(target, ids, max_tokens=40, ignore_eos=True, draft_model=draft, draft_n_max=n_max) == toks
        t = target.timings
        full = np.asarray(ids + toks, np.int64)
        rows = fresh.model.forward(full, Batch.run(0, 0, full.size), fresh.cache, n_out=len(toks))[:-1]
        want = _replay(rows.argmax(1) == np.asarray(toks[1:]), n_max)
        assert (t.draft_n, t.draft_n_accepted, t.n_eval) == want, (p, n_max)
        assert 0 < want[1] < want[0]


def test_greedy_identity_qwen_coder_ngram(qwen25_path):
    eng = Engine(qwen25_path, n_ctx=512, n_threads=1)
    ids = eng.tokenizer.encode(CODE, special=True)
    plain = _run(eng, ids, max_tokens=40)
    t_plain = eng.timings.n_eval
    spec = _run(eng, ids, max_tokens=40, draft_model=NgramSimple(3, 16))
    assert spec == plain
    assert eng.timings.draft_n_accepted >= 10 and eng.timings.n_eval < t_plain


def test_sampled_output_is_the_same_with_a_seed(target, draft):
    """Each token is drawn by the run's own sampler from the target's logits in the same order, so a
    seeded sampled run is the same token for token (the distribution is the target's, exactly)."""
    s = SamplerParams(temperature=0.9, top_k=40, top_p=0.95, repeat_penalty=1.1, seed=1234)
    ids = target.tokenizer.encode(PROMPTS[2], special=True)
    plain = _run(target, ids, s, max_tokens=32)
    for prop in (NgramSimple(1, 4), draft):
        assert _run(target, ids, s, max_tokens=32, draft_model=prop, draft_n_max=4) == plain
        assert target.timings.draft_n > 0             # drafts were proposed and checked
    # the draft model's drafts are taken as well (6 of 90 at seed 1234); the n-gram lookup's, on sampled
    # text, only by chance (0 of 8 at seed 1234 since attention's order became fixed, issue 26)
    assert target.timings.draft_n_accepted > 0


def _chi2_same(a, b, min_count: int = 10):
    """Two-sample chi-square homogeneity test of two Counters (rare categories pooled): (statistic,
    the critical value at p = 0.001 by the Wilson-Hilferty approximation)."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= min_count]
    rows = [(a[k], b[k]) for k in keys]
    rest = (sum(a.values()) - sum(r[0] for r in rows), sum(b.values()) - sum(r[1] for r in rows))
    if sum(rest):
        rows.append(rest)
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for x, y in rows:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    k = len(rows) - 1
    z = 3.09
    crit = k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3
    return stat, crit, k


def test_sampled_distribution_is_the_targets(target, draft):
    """Sampled runs with different seeds on the two sides: the first three tokens' joint histogram with a
    draft model (n_max 2: tokens 2 and 3 come from verification rows) matches plain sampling (chi-square)."""
    from collections import Counter
    ids = target.tokenizer.encode(PROMPTS[0], special=True)
    n = 150
    plain, spec = Counter(), Counter()
    drafted = accepted = 0
    for i in range(n):
        plain[tuple(_run(target, ids, SamplerParams(temperature=1.0, seed=i), max_tokens=3))] += 1
        spec[tuple(_run(target, ids, SamplerParams(temperature=1.0, seed=100_000 + i), max_tokens=3,
                        draft_model=draft, draft_n_max=2))] += 1
        drafted, accepted = drafted + target.timings.draft_n, accepted + target.timings.draft_n_accepted
    assert accepted >= 15 and drafted > accepted       # (here: 150 drafted, 39 accepted)
    stat, crit, k = _chi2_same(plain, spec)
    assert k >= 3, (plain, spec)
    assert stat < crit, (stat, crit, k)
    # the test has power: always taking the draft's guess would be caught
    greedy = Counter({tuple(_run(target, ids, GREEDY, max_tokens=3)): n})
    assert _chi2_same(plain, greedy)[0] > _chi2_same(plain, greedy)[1]


def test_grammar_and_stop_with_speculation(target, draft):
    from tinyinfer.grammar import Grammar
    g = Grammar.from_json_schema('{"type": "object", "properties": {"name": {"type": "string"}, '
                                 '"age": {"type": "integer"}}, "required": ["name", "age"]}')
    ids = target.tokenizer.encode("Give a person as JSON: ", special=True)
    plain = list(target.generate(ids, GREEDY, max_tokens=30, grammar=g))
    spec = list(target.generate(ids, GREEDY, max_tokens=30, grammar=g, draft_model=draft, draft_n_max=4))
    assert [(s.token, s.text, s.finish_reason) for s in spec] == [(s.token, s.text, s.finish_reason) for s in plain]
    ids = target.tokenizer.encode(PROMPTS[2], special=True)
    plain = list(target.generate(ids, GREEDY, max_tokens=40, stop=["dog"]))
    spec = list(target.generate(ids, GREEDY, max_tokens=40, stop=["dog"], draft_model=NgramSimple(2, 8)))
    assert "".join(s.text for s in spec) == "".join(s.text for s in plain)
    assert spec[-1].finish_reason == plain[-1].finish_reason


def test_context_end_with_speculation(smollm2_path, draft):
    eng = Engine(smollm2_path, n_ctx=40, n_threads=1)
    ids = eng.tokenizer.encode(PROMPTS[2], special=True)
    plain = list(eng.generate(ids, GREEDY))
    spec = list(eng.generate(ids, GREEDY, draft_model=draft, draft_n_max=8))
    assert [s.token for s in spec] == [s.token for s in plain]
    assert spec[-1].finish_reason == plain[-1].finish_reason == "length"
    assert len(eng.tokens) <= eng.n_ctx


def test_draft_vocabulary_is_checked(smollm2_path, qwen25_path):
    a = Engine.vocab_only(smollm2_path)
    b = Engine.vocab_only(qwen25_path)
    with pytest.raises(SpecError, match="vocabulary") as e:
        check_vocab(a.tokenizer, b.tokenizer, "qwen.gguf")
    assert "\n" not in str(e.value)
    check_vocab(a.tokenizer, a.tokenizer)


# -- faces ---------------------------------------------------------------------------------------

def test_llama_draft_model(smollm2_path, q4_0_path, qwen25_path):
    from tinyinfer import Llama, LlamaPromptLookupDecoding as Lookup
    plain = Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False)
    spec = Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False, draft_model=Lookup(num_pred_tokens=4))
    kw = dict(max_tokens=40, temperature=0.0)
    for p in PROMPTS:
        assert spec(p, **kw)["choices"][0]["text"] == plain(p, **kw)["choices"][0]["text"]
    assert spec.timings.draft_n > 0
    dspec = Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False,
                  draft_model=Llama(str(q4_0_path), n_ctx=256, n_threads=1, verbose=False))
    assert dspec(PROMPTS[1], **kw)["choices"][0]["text"] == plain(PROMPTS[1], **kw)["choices"][0]["text"]
    assert dspec.timings.draft_n_accepted > 0
    with pytest.raises(ValueError, match="vocabulary"):
        Llama(str(smollm2_path), n_ctx=256, verbose=False,
              draft_model=Llama(str(qwen25_path), vocab_only=True, verbose=False))


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "tinyinfer", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "NUMBA_NUM_THREADS": "1"})
    return r


def test_cli_greedy_identity(smollm2_path, q4_0_path):
    base = ["-m", str(smollm2_path), "-p", PROMPTS[1], "-n", "40", "--temp", "0", "-t", "1", "-c", "256"]
    plain = _cli(*base)
    assert plain.returncode == 0, plain.stderr
    for extra in (["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "2",
                   "--spec-ngram-simple-size-m", "6"],
                  ["-md", str(q4_0_path), "--spec-draft-n-max", "6", "-td", "1"]):
        r = _cli(*base, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout
        assert "accepted (acceptance rate" in r.stderr


def test_cli_errors_in_one_line(smollm2_path, qwen25_path):
    r = _cli("-m", str(smollm2_path), "-p", "x", "-n", "2", "-md", str(qwen25_path))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: ") and "vocabulary" in last, r.stderr
    r = _cli("-m", str(smollm2_path), "-p", "x", "-n", "2", "--spec-type", "ngram-cache")
    assert r.returncode == 1 and "not supported" in r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def spec_server(smollm2_path, q4_0_path):
    """Two slots, each with its own draft cache."""
    from conftest import serve_process
    yield from serve_process(smollm2_path, "-c", "512", "-t", "1", "--parallel", "2", "-md", str(q4_0_path),
                             "--spec-draft-n-max", "6")


def test_server_greedy_identity_and_timings(spec_server, smollm2_path):
    import httpx
    from tinyinfer import Llama
    plain = Llama(str(smollm2_path), n_ctx=512, n_threads=1, verbose=False)
    for p in PROMPTS:
        r = httpx.post(spec_server + "/v1/completions", json={"prompt": p, "max_tokens": 40, "temperature": 0,
                                                                "repeat_penalty": 1.0}, timeout=120)
        assert r.status_code == 200, r.text
        j = r.json()
        want = plain(p, max_tokens=40, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
        assert j["choices"][0]["text"] == want
        t = j["timings"]
        assert t["draft_n"] >= t["draft_n_accepted"] > 0 or p == PROMPTS[0]
    # llama-server's per-request field: speculative.n_max
    r = httpx.post(spec_server + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0,
                                                            "speculative.n_max": 2}, timeout=120)
    assert r.status_code == 200 and r.json()["timings"]["draft_n"] > 0


def test_server_parallel_slots_speculate_each(spec_server, smollm2_path):
    """--parallel 2: each slot has its own draft cache; guesses are checked as a chunk of their own while
    the other slot decodes; concurrent greedy replies are those of plain decoding."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor
    from tinyinfer import Llama
    plain = Llama(str(smollm2_path), n_ctx=512, n_threads=1, verbose=False)
    want = {p: plain(p, max_tokens=32, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"] for p in PROMPTS}

    def ask(p):
        r = httpx.post(spec_server + "/v1/completions", timeout=300,
                       json={"prompt": p, "max_tokens": 32, "temperature": 0, "repeat_penalty": 1.0})
        assert r.status_code == 200, r.text
        return p, r.json()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, PROMPTS + PROMPTS[::-1]))
    for p, j in got:
        assert j["choices"][0]["text"] == want[p], p
    assert sum(j["timings"].get("draft_n_accepted", 0) for _, j in got) > 0


def test_server_refuses_speculative_with_ray(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "tinyinfer", "serve", "-m", str(smollm2_path), "--ray",
                        "--spec-type", "ngram-simple"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: speculative decoding"), r.stderr


def test_logits_processor_sees_the_same_context(target):
    """llama-cpp-python's logits_processor(input_ids, scores) gets the context of the token being sampled,
    never the unchecked guesses after it."""
    ids = target.tokenizer.encode(PROMPTS[2], special=True)
    seen = {"plain": [], "spec": []}

    def recorder(key):
        def f(tokens, logits):
            seen[key].append(list(tokens))
            return logits
        return f
    plain = _run(target, ids, max_tokens=30, logits_processor=recorder("plain"))
    spec = _run(target, ids, max_tokens=30, logits_processor=recorder("spec"), draft_model=NgramSimple(2, 8))
    assert target.timings.draft_n_accepted > 0
    assert spec == plain and seen["spec"] == seen["plain"]
