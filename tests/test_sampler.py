"""Tests for tinyinfer.sampler: each stage on hand-computed distributions,
the stages against naive loop transliterations of llama.cpp's semantics,
and the chain (greedy, seeds, penalties window, logit bias, mirostat,
min_keep, empirical frequencies)."""

import math

import numpy as np
import pytest

from tinyinfer.sampler import (
    Sampler,
    SamplerParams,
    apply_logit_bias,
    apply_penalties,
    dist,
    greedy,
    min_p,
    mirostat_v1,
    mirostat_v2,
    softmax,
    temperature,
    top_k,
    top_p,
    typical_p,
)

NEG_INF = float("-inf")


def logp(*probs):
    """float32 logits whose softmax is ``probs``."""
    return np.log(np.array(probs, dtype=np.float64)).astype(np.float32)


class StubRng:
    """Stands in for np.random.Generator: hands out fixed uniform numbers."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def chi_square(counts, probs):
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(probs, dtype=np.float64)
    return float(np.sum((counts - expected) ** 2 / expected))


# chi-square critical values at alpha = 0.001
CHI2_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def greedy_params(**kw):
    return SamplerParams(temperature=0.0, **kw)


def plain_params(**kw):
    """Only temperature + dist unless told otherwise."""
    base = dict(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0, seed=1234)
    base.update(kw)
    return SamplerParams(**base)


# --------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------

def test_params_defaults_match_llama_cpp():
    p = SamplerParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.presence_penalty, p.frequency_penalty) == (1.0, 64, 0.0, 0.0)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta, p.min_keep) == (0, 5.0, 0.1, 1)
    assert p.seed is None and p.logit_bias == {}
    assert p.temp == 0.8


def test_params_aliases_and_validation():
    from tinyinfer.options import build
    p = build("llama.cpp", dict(temp=0.5, penalty_repeat=1.1, penalty_last_n=32, typ_p=0.9,
                                penalty_freq=0.2, penalty_present=0.3)).sampler
    assert (p.temperature, p.repeat_penalty, p.repeat_last_n, p.typical_p) == (0.5, 1.1, 32, 0.9)
    assert (p.frequency_penalty, p.presence_penalty) == (0.2, 0.3)
    with pytest.raises(TypeError, match="tempreature"):
        build("llama.cpp", dict(tempreature=0.5))
    with pytest.raises(TypeError):
        build("llama.cpp", dict(temp=0.5, temperature=0.6))
    with pytest.raises(ValueError):
        SamplerParams(mirostat=3)
    with pytest.raises(ValueError):
        SamplerParams(repeat_last_n=-2)
    with pytest.raises(ValueError):
        SamplerParams(top_p=float("nan"))
    with pytest.raises(ValueError):
        SamplerParams(logit_bias={3: float("inf")})
    with pytest.raises(ValueError):
        SamplerParams(seed=-5)
    # JSON-style keys and pair lists are normalised
    assert SamplerParams(logit_bias={"7": -1}).logit_bias == {7: -1.0}
    assert SamplerParams(logit_bias=[[7, NEG_INF]]).logit_bias == {7: NEG_INF}
    assert "top_k = 40" in SamplerParams().describe()


# --------------------------------------------------------------------------
# stages on their own, hand-computed
# --------------------------------------------------------------------------

def test_logit_bias_adds_and_bans_without_mutating():
    x = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    before = x.copy()
    ids, out = apply_logit_bias(None, x, {1: 0.5, 3: NEG_INF, 99: 5.0})
    assert ids is None
    np.testing.assert_array_equal(out, [1.0, 2.5, 3.0, NEG_INF])
    np.testing.assert_array_equal(x, before)
    # on a candidate subset in arbitrary order: found by id, not by position
    ids = np.array([30, 10, 20])
    got_ids, out = apply_logit_bias(ids, np.array([0.0, 1.0, 2.0], np.float32), {20: -2.0, 1: 100.0})
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.0])


def test_penalties_hand_computed():
    x = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
    counts = {0: 2, 1: 1, 2: 0, 4: 1}
    _, out = apply_penalties(None, x, counts, repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0)
    # id0: 2/2 - (2*0.5 + 1) = -1 ; id1: -1*2 - (0.5 + 1) = -3.5 ; id2 count 0: untouched
    # id3 unseen: untouched ; id4: 0 <= 0 so multiplied (stays 0), then - 1.5
    np.testing.assert_allclose(out, [-1.0, -3.5, 0.5, 3.0, -1.5])
    # the window itself instead of counts gives the same
    _, out2 = apply_penalties(None, x, [0, 1, 4, 0], 2.0, 0.5, 1.0)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(x, [2.0, -1.0, 0.5, 3.0, 0.0])  # not mutated


def test_repeat_penalty_positive_divides_negative_multiplies():
    x = np.array([4.0, -4.0, 1.0], dtype=np.float32)
    _, out = apply_penalties(None, x, [0, 1], repeat_penalty=1.25)
    # both seen tokens lose probability: positive shrinks toward 0, negative grows away from 0
    np.testing.assert_allclose(out, [3.2, -5.0, 1.0])
    # frequency counts occurrences, presence only presence
    _, out = apply_penalties(None, x, [2, 2, 2], frequency_penalty=0.5)
    np.testing.assert_allclose(out, [4.0, -4.0, -0.5])
    _, out = apply_penalties(None, x, [2, 2, 2], presence_penalty=0.5)
    np.testing.assert_allclose(out, [4.0, -4.0, 0.5])
    # subset candidate set, ids in arbitrary order
    ids = np.array([7, 2, 5])
    _, out = apply_penalties(ids, np.array([1.0, 1.0, -1.0], np.float32), [5, 5, 9], 2.0, 0.1, 0.0)
    np.testing.assert_allclose(out, [1.0, 1.0, -2.2])


def test_top_k_hand_computed():
    x = np.array([1, 5, 3, 4, 2], dtype=np.float32)
    ids, lg = top_k(None, x, 2)
    np.testing.assert_array_equal(ids, [1, 3])
    np.testing.assert_array_equal(lg, [5, 4])
    ids, lg = top_k(None, x, 0)  # disabled
    assert ids is None and lg is x
    ids, _ = top_k(None, x, 99)  # larger than the set: everything, sorted
    np.testing.assert_array_equal(ids, [1, 3, 2, 4, 0])
    ids, _ = top_k(None, x, 2, min_keep=3)
    np.testing.assert_array_equal(ids, [1, 3, 2])
    ids, _ = top_k(np.array([50, 51, 52, 53, 54]), x, 1)
    np.testing.assert_array_equal(ids, [51])


@pytest.mark.parametrize("k", [1, 40, 1000])
def test_top_k_large_vocab_matches_full_sort(k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal(262144) * 3).astype(np.float32)
    ids, lg = top_k(None, x, k)
    ref = np.argsort(-x, kind="stable")[:k]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(lg, x[ref])
    # heavy ties: rounded logits; ties go to the lower token id
    y = np.round(x).astype(np.float32)
    ids, _ = top_k(None, y, k)
    np.testing.assert_array_equal(ids, np.argsort(-y, kind="stable")[:k])
    # adversarial layout: the largest values all in one block, ascending
    z = np.full(262144, -5.0, dtype=np.float32)
    z[1000:1000 + 2 * k] = np.arange(2 * k, dtype=np.float32)
    ids, _ = top_k(None, z, k)
    np.testing.assert_array_equal(ids, np.arange(1000 + 2 * k - 1, 1000 + k - 1, -1))
    # a vocabulary mostly masked to -inf (grammar / bans), fewer live tokens than k
    m = np.full(262144, NEG_INF, dtype=np.float32)
    live = rng.choice(262144, size=max(k // 2, 1), replace=False)
    m[live] = rng.standard_normal(live.size).astype(np.float32)
    ids, _ = top_k(None, m, k)
    np.testing.assert_array_equal(ids, np.argsort(-m, kind="stable")[:k])
    # everything equal and strictly ascending
    for w in (np.zeros(262144, np.float32), np.arange(262144, dtype=np.float32)):
        ids, _ = top_k(None, w, k)
        np.testing.assert_array_equal(ids, np.argsort(-w, kind="stable")[:k])


def test_typical_p_hand_computed():
    x = logp(0.4, 0.3, 0.2, 0.1)
    # H = 1.2799 nats ; -ln p = 0.916, 1.204, 1.609, 2.303
    # |-ln p - H| = 0.364, 0.076, 0.330, 1.023  ->  typicality order 1, 2, 0, 3
    # cumulative mass in that order: 0.3, 0.5, 0.9, 1.0 ; keep until mass > p
    ids, lg = typical_p(None, x, 0.45)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_allclose(lg, x[[1, 2]])
    ids, _ = typical_p(None, x, 0.6)
    np.testing.assert_array_equal(ids, [1, 2, 0])
    ids, _ = typical_p(None, x, 0.2, min_keep=3)
    np.testing.assert_array_equal(ids, [1, 2, 0])
    ids, lg = typical_p(None, x, 1.0)  # no-op
    assert ids is None and lg is x


def test_top_p_hand_computed():
    ids = np.array([10, 11, 12, 13])
    x = logp(0.1, 0.4, 0.2, 0.3)
    # sorted: 11 (0.4), 13 (0.3), 12 (0.2), 10 (0.1); cumulative 0.4 0.7 0.9 1.0
    expect = {0.65: [11, 13], 0.75: [11, 13, 12], 0.95: [11, 13, 12, 10], 0.3: [11]}
    for p, want in expect.items():
        got, lg = top_p(ids, x, p)
        np.testing.assert_array_equal(got, want, err_msg=f"top_p={p}")
        assert np.all(np.diff(lg) <= 0)
    got, _ = top_p(ids, x, 0.3, min_keep=3)
    np.testing.assert_array_equal(got, [11, 13, 12])
    got, lg = top_p(ids, x, 1.0)  # no-op keeps order
    assert got is ids and lg is x


def test_min_p_hand_computed():
    x = logp(0.5, 0.2, 0.04, 0.26)
    ids, _ = min_p(None, x, 0.1)  # bound 0.05: drops 0.04, keeps order
    np.testing.assert_array_equal(ids, [0, 1, 3])
    ids, _ = min_p(None, x, 0.5)  # bound 0.25
    np.testing.assert_array_equal(ids, [0, 3])
    ids, _ = min_p(None, x, 0.5, min_keep=3)  # too few pass: the 3 most likely, sorted
    np.testing.assert_array_equal(ids, [0, 3, 1])
    ids, lg = min_p(None, x, 0.0)
    assert ids is None and lg is x


def test_temperature_softmax_greedy():
    x = np.array([1.0, 3.0, 2.0, 3.0], dtype=np.float32)
    _, lg = temperature(None, x, 2.0)
    np.testing.assert_allclose(lg, [0.5, 1.5, 1.0, 1.5])
    ids, lg = temperature(None, x, 0.0)  # only the first maximum survives
    np.testing.assert_array_equal(ids, [1])
    assert greedy(None, x) == 1
    assert greedy(np.array([9, 8, 7, 6]), x) == 8
    p = softmax(logp(0.5, 0.3, 0.2))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.2], rtol=1e-6)
    p = softmax(np.array([0.0, NEG_INF, 0.0], np.float32))
    np.testing.assert_array_equal(p, [0.5, 0.0, 0.5])


def test_dist_inverse_cdf_with_stub_rng():
    x = logp(0.5, 0.3, 0.2)
    ids = np.array([7, 8, 9])
    # cumulative 0.5, 0.8, 1.0
    assert dist(ids, x, StubRng(0.0)) == 7
    assert dist(ids, x, StubRng(0.49)) == 7
    assert dist(ids, x, StubRng(0.51)) == 8
    assert dist(ids, x, StubRng(0.79)) == 8
    assert dist(ids, x, StubRng(0.81)) == 9
    assert dist(ids, x, StubRng(0.999999)) == 9
    # zero-probability entries are never drawn, at either end
    y = np.array([NEG_INF, 0.0, NEG_INF], np.float32)
    assert dist(None, y, StubRng(0.0)) == 1
    assert dist(None, y, StubRng(0.9999999999)) == 1


def test_dist_long_vector_matches_exact_inverse_cdf():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(50000) * 2).astype(np.float32)
    w = np.exp(x.astype(np.float64) - x.max())
    cum = np.cumsum(w)
    for r in np.linspace(0.0, 0.999999, 97):
        want = int(np.searchsorted(cum, r * cum[-1], side="right"))
        assert dist(None, x, StubRng(float(r))) == want


def test_dist_empirical_frequencies():
    probs = [0.5, 0.3, 0.15, 0.05]
    x = logp(*probs)
    rng = np.random.default_rng(2024)
    n = 20000
    counts = np.bincount([dist(None, x, rng) for _ in range(n)], minlength=4)
    assert chi_square(counts, probs) < CHI2_001[3]


def test_dist_empirical_frequencies_full_vocab():
    # 262144 entries, five live tokens spread over the vocabulary
    live = np.array([3, 70001, 131072, 200000, 262143])
    probs = np.array([0.1, 0.25, 0.3, 0.05, 0.3])
    x = np.full(262144, -1e4, dtype=np.float32)
    x[live] = logp(*probs)
    s = Sampler(plain_params(seed=7), 262144)
    toks = np.array([s.sample(x) for _ in range(3000)])
    assert set(np.unique(toks)) <= set(live.tolist())
    counts = np.array([(toks == t).sum() for t in live])
    assert chi_square(counts, probs) < CHI2_001[4]


def test_mirostat_v2_hand_computed():
    x = logp(0.5, 0.25, 0.15, 0.06, 0.04)
    # mu = 3: keep surprise -log2 p <= 3, i.e. p >= 1/8: tokens 0, 1, 2 (mass 0.9)
    tok, mu = mirostat_v2(None, x, StubRng(0.0), tau=1.5, eta=0.1, mu=3.0)
    # token 0, renormalised 0.5/0.9: surprise log2(1.8) = 0.848 ; mu = 3 - 0.1*(0.848-1.5)
    assert tok == 0
    assert mu == pytest.approx(3.0 - 0.1 * (math.log2(1.8) - 1.5), rel=1e-6)
    tok, mu = mirostat_v2(None, x, StubRng(0.99), tau=1.5, eta=0.1, mu=3.0)
    # last of the kept set: token 2, renormalised 1/6
    assert tok == 2
    assert mu == pytest.approx(3.0 - 0.1 * (math.log2(6.0) - 1.5), rel=1e-6)
    # mu below every surprise keeps the most likely token only
    tok, mu = mirostat_v2(np.array([4, 5, 6, 7, 8]), x, StubRng(0.99), tau=1.5, eta=0.1, mu=0.5)
    assert tok == 4 and mu == pytest.approx(0.5 + 0.15)


def test_mirostat_v2_sampler_tracks_mu_and_truncation():
    probs = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    temp = 0.9
    x = logp(*probs)
    params = SamplerParams(mirostat=2, mirostat_tau=1.5, mirostat_eta=0.1, temperature=temp, seed=11)
    s = Sampler(params, 5)
    assert s.mu == 3.0  # 2 * tau
    q = softmax(x / np.float32(temp))
    seen, kept_sizes, surprises = set(), set(), []
    for _ in range(300):
        mu = s.mu
        kept = np.flatnonzero(-np.log2(q) <= mu)
        if kept.size == 0:
            kept = np.array([0])
        tok = s.sample(x)
        assert tok in kept
        renorm = q[tok] / q[kept].sum()
        assert s.mu == pytest.approx(mu - 0.1 * (-math.log2(renorm) - 1.5), rel=1e-5)
        seen.add(tok)
        kept_sizes.add(kept.size)
        surprises.append(-math.log2(renorm))
    assert {0, 1, 2} <= seen
    assert len(kept_sizes) > 1     # mu moves the truncation point
    # the feedback loop holds the observed surprise near tau
    assert np.mean(surprises[100:]) == pytest.approx(1.5, abs=0.25)
    s.reset()
    assert s.mu == 3.0


def test_mirostat_v1_sampler_matches_independent_computation():
    rng = np.random.default_rng(5)
    n_vocab = 500
    tau, eta = 3.0, 0.1
    s = Sampler(SamplerParams(mirostat=1, mirostat_tau=tau, mirostat_eta=eta, temperature=1.0, seed=3), n_vocab)
    assert s.mu == 2 * tau
    sizes = set()
    for step in range(40):
        x = (rng.standard_normal(n_vocab) * 2.5).astype(np.float32)
        mu = s.mu
        order = np.argsort(-x, kind="stable")
        p = softmax(x[order])
        i = np.arange(99)
        t = np.log((i + 2) / (i + 1))
        b = np.log(p[:99] / p[1:100])
        s_hat = np.sum(t * b) / np.sum(t * t)
        eps = s_hat - 1
        k = (eps * 2.0 ** mu / (1 - n_vocab ** (-eps))) ** (1 / s_hat)
        k = int(min(max(k, 1), n_vocab))
        tok = s.sample(x)
        rank = int(np.flatnonzero(order == tok)[0])
        assert rank < k
        renorm = p[rank] / p[:k].sum()
        assert s.mu == pytest.approx(mu - eta * (-math.log2(renorm) - tau), rel=1e-4, abs=1e-5)
        sizes.add(k)
    assert len(sizes) > 1  # k follows mu


def test_mirostat_v1_function_returns_new_mu():
    x = logp(0.6, 0.2, 0.1, 0.05, 0.05)
    tok, mu = mirostat_v1(None, x, StubRng(0.0), tau=5.0, eta=0.1, mu=10.0, n_vocab=5)
    assert tok == 0 and mu != 10.0


# --------------------------------------------------------------------------
# stages against naive llama.cpp-style loops, random inputs
# --------------------------------------------------------------------------

def _ref_sorted(x):
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    e = np.exp(x - x.max())
    p = e / e.sum(dtype=np.float64)
    return order, p


def ref_top_p(x, p, min_keep):
    order, probs = _ref_sorted(x)
    cum, last = 0.0, len(x)
    for i, j in enumerate(order):
        cum += probs[j]
        if cum >= p and i + 1 >= min_keep:
            last = i + 1
            break
    return order[:last]


def ref_min_p(x, p, min_keep):
    order, _ = _ref_sorted(x)
    bound = x.max() + np.float32(math.log(p))
    i = 1
    while i < len(x):
        if x[order[i]] < bound and i >= min_keep:
            break
        i += 1
    return order[:i]


def ref_typical(x, p, min_keep):
    order, probs = _ref_sorted(x)
    ps = [probs[j] for j in order]
    h = -sum(q * math.log(q) for q in ps if q > 0)
    shifted = [abs(-math.log(q) - h) if q > 0 else math.inf for q in ps]
    by = sorted(range(len(ps)), key=lambda i: (shifted[i], i))
    cum, last = 0.0, len(ps)
    for i, j in enumerate(by):
        cum += ps[j]
        if cum > p and (min_keep == 0 or i >= min_keep - 1):
            last = i + 1
            break
    return [order[j] for j in by[:last]]


def test_stages_match_naive_references_on_random_inputs():
    rng = np.random.default_rng(99)
    for case in range(150):
        n = int(rng.integers(1, 60))
        x = (rng.standard_normal(n) * rng.uniform(0.3, 4)).astype(np.float32)
        p = float(rng.uniform(0.05, 0.99))
        mk = int(rng.integers(0, 5))
        ids = rng.permutation(10 * n)[:n]
        got, _ = top_p(ids, x, p, mk)
        np.testing.assert_array_equal(got, ids[ref_top_p(x, p, mk)], err_msg=f"top_p case {case}")
        got, _ = min_p(ids, x, p, mk)
        assert sorted(got) == sorted(ids[ref_min_p(x, p, mk)]), f"min_p case {case}"
        got, _ = typical_p(ids, x, p, mk)
        np.testing.assert_array_equal(got, ids[ref_typical(x, p, mk)], err_msg=f"typical case {case}")
        k = int(rng.integers(1, n + 2))
        got, _ = top_k(ids, x, k)
        np.testing.assert_array_equal(got, ids[_ref_sorted(x)[0][:k]], err_msg=f"top_k case {case}")


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: nucleus < 256 tokens ; flat: much larger
def test_top_p_full_vocab_matches_full_sort(scale):
    rng = np.random.default_rng(int(scale * 10))
    x = (rng.standard_normal(262144) * scale).astype(np.float32)
    ids, lg = top_p(None, x, 0.9)
    order = np.argsort(-x, kind="stable")
    e = np.exp(x[order] - x.max())
    cum = np.cumsum(e, dtype=np.float64) / e.sum(dtype=np.float64)
    last = int(np.argmax(cum >= 0.9)) + 1
    np.testing.assert_array_equal(ids, order[:last])
    assert (last < 256) == (scale == 8.0)


# --------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------

def test_greedy_at_temperature_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    s = Sampler(greedy_params(), 1000)
    assert s.chain()[-1] == "greedy"
    assert all(s.sample(x) == int(np.argmax(x)) for _ in range(5))
    # also with mirostat selected
    assert Sampler(greedy_params(mirostat=2), 1000).sample(x) == int(np.argmax(x))
    # and negative temperature
    assert Sampler(SamplerParams(temperature=-1.0), 1000).sample(x) == int(np.argmax(x))


def test_seed_reproducibility():
    rng = np.random.default_rng(1)
    xs = [(rng.standard_normal(2000) * 2).astype(np.float32) for _ in range(60)]

    def run(seed, params=None):
        s = Sampler(params or SamplerParams(seed=seed, top_k=0, top_p=1.0, min_p=0.0, temperature=1.5), 2000)
        return [s.sample(x) for x in xs]

    a, b, c = run(42), run(42), run(43)
    assert a == b
    assert a != c
    # reset() replays the sequence
    s = Sampler(SamplerParams(seed=42, top_k=0, top_p=1.0, min_p=0.0, temperature=1.5), 2000)
    first = [s.sample(x) for x in xs]
    s.reset()
    assert [s.sample(x) for x in xs] == first == a
    # a random seed is reported and reproduces the run
    r = Sampler(SamplerParams(seed=-1, top_k=0, top_p=1.0, min_p=0.0, temperature=1.5), 2000)
    assert isinstance(r.seed, int)
    seq = [r.sample(x) for x in xs]
    assert run(None, SamplerParams(seed=r.seed, top_k=0, top_p=1.0, min_p=0.0, temperature=1.5)) == seq


def test_sample_does_not_mutate_logits():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(300).astype(np.float32)
    before = x.copy()
    s = Sampler(SamplerParams(seed=1, repeat_penalty=1.5, presence_penalty=0.5,
                              logit_bias={int(np.argmax(x)): NEG_INF}), 300)
    for t in range(20):
        s.accept(t)
    for _ in range(10):
        s.sample(x)
    np.testing.assert_array_equal(x, before)


def test_logit_bias_bans_token():
    x = logp(0.7, 0.2, 0.1)
    s = Sampler(greedy_params(logit_bias={0: NEG_INF}), 3)
    assert s.sample(x) == 1
    s = Sampler(plain_params(logit_bias={0: NEG_INF}, seed=5), 3)
    toks = [s.sample(x) for _ in range(500)]
    assert 0 not in toks and {1, 2} <= set(toks)
    # a positive bias forces a token
    assert Sampler(greedy_params(logit_bias={2: 10.0}), 3).sample(x) == 2
    with pytest.raises(ValueError):
        Sampler(SamplerParams(logit_bias={3: 1.0}), 3)
    with pytest.raises(ValueError):
        Sampler(greedy_params(logit_bias={0: NEG_INF, 1: NEG_INF, 2: NEG_INF}), 3).sample(x)


def test_penalty_window_is_a_ring_of_last_n():
    x = np.array([3.0, 2.9, 2.8, 0.0], dtype=np.float32)
    s = Sampler(greedy_params(repeat_penalty=10.0, repeat_last_n=2), 4)
    assert s.sample(x) == 0
    s.accept(0)
    assert s.sample(x) == 1          # 0 penalised to 0.3
    s.accept(1)
    assert s.sample(x) == 2          # 0 and 1 penalised
    s.accept(2)
    assert s.history == (1, 2)
    assert s.sample(x) == 0          # 0 left the window
    s.reset()
    assert s.history == () and s.sample(x) == 0


def test_penalty_window_disabled_and_whole_context():
    x = np.array([3.0, 2.9, 2.8, 0.0], dtype=np.float32)
    off = Sampler(greedy_params(repeat_penalty=10.0, repeat_last_n=0), 4)
    off.accept(0)
    assert off.history == () and off.sample(x) == 0
    everything = Sampler(greedy_params(repeat_penalty=10.0, repeat_last_n=-1), 4)
    for t in [0] + [3] * 500:
        everything.accept(t)
    assert everything.sample(x) == 1   # 0 is still remembered 500 tokens later
    bounded = Sampler(greedy_params(repeat_penalty=10.0, repeat_last_n=-1), 4, n_ctx=100)
    for t in [0] + [3] * 500:
        bounded.accept(t)
    assert bounded.sample(x) == 0      # -1 means the context size when one is given


def test_frequency_and_presence_penalties_through_sampler():
    x = np.array([2.0, 1.5, 1.0], dtype=np.float32)
    s = Sampler(greedy_params(frequency_penalty=0.3), 3)
    s.accept(0)
    assert s.sample(x) == 0            # 2.0 - 0.3 = 1.7 > 1.5
    s.accept(0)
    assert s.sample(x) == 1            # 2.0 - 0.6 = 1.4 < 1.5
    s = Sampler(greedy_params(presence_penalty=0.4), 3)
    for _ in range(5):
        s.accept(0)
    assert s.sample(x) == 0            # 2.0 - 0.4 = 1.6, however often seen
    s.accept(1)
    assert s.sample(x) == 0
    with pytest.raises(ValueError):
        s.accept(3)


def test_chain_truncates_before_temperature():
    # min_p sees the untempered distribution: 0.5, 0.3, 0.2 with min_p 0.5 keeps {0, 1};
    # tempered first (T=0.5 -> 0.66, 0.24, 0.10) it would keep {0} only
    x = logp(0.5, 0.3, 0.2)
    s = Sampler(plain_params(min_p=0.5, temperature=0.5, seed=9), 3)
    toks = np.array([s.sample(x) for _ in range(4000)])
    assert 2 not in toks
    w = np.array([0.25, 0.09])           # (0.5^2, 0.3^2)
    counts = np.bincount(toks, minlength=2)[:2]
    assert chi_square(counts, w / w.sum()) < CHI2_001[1]


def test_chain_top_k_and_temperature_frequencies():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(5000).astype(np.float32)
    s = Sampler(plain_params(top_k=3, temperature=2.0, seed=21), 5000)
    top3 = np.argsort(-x)[:3]
    toks = np.array([s.sample(x) for _ in range(3000)])
    assert set(toks.tolist()) == set(top3.tolist())
    counts = np.array([(toks == t).sum() for t in top3])
    assert chi_square(counts, softmax(x[top3] / 2.0)) < CHI2_001[2]


def test_min_keep_in_chain():
    x = logp(0.6, 0.2, 0.1, 0.05, 0.05)
    one = Sampler(plain_params(min_p=0.9, seed=3), 5)
    assert {one.sample(x) for _ in range(200)} == {0}
    three = Sampler(plain_params(min_p=0.9, min_keep=3, seed=3), 5)
    toks = np.array([three.sample(x) for _ in range(3000)])
    assert set(toks.tolist()) == {0, 1, 2}
    assert chi_square(np.bincount(toks, minlength=3), np.array([6, 2, 1]) / 9) < CHI2_001[2]
    # top_p and top_k respect it too
    tp = Sampler(plain_params(top_p=0.1, min_keep=2, seed=3), 5)
    assert {tp.sample(x) for _ in range(300)} == {0, 1}
    tk = Sampler(plain_params(top_k=1, min_keep=2, seed=3), 5)
    assert {tk.sample(x) for _ in range(300)} == {0, 1}


def test_default_chain_full_vocab_stays_in_top_40():
    rng = np.random.default_rng(8)
    n = 262144
    s = Sampler(SamplerParams(seed=0), n)
    for _ in range(20):
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        top40 = set(np.argsort(-x)[:40].tolist())
        tok = s.sample(x)
        assert tok in top40
        s.accept(tok)


def test_bad_inputs_fail_loudly():
    s = Sampler(SamplerParams(seed=0), 10)
    with pytest.raises(ValueError):
        s.sample(np.zeros(11, np.float32))
    with pytest.raises(ValueError):
        s.sample(np.zeros((2, 5), np.float32))
    bad = np.zeros(10, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        s.sample(bad)
    with pytest.raises(ValueError):
        Sampler(SamplerParams(), 0)
    # float64 / list input is accepted
    assert 0 <= s.sample([0.0] * 10) < 10
    with pytest.raises(ValueError):
        dist(None, np.full(4, NEG_INF, np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        dist(None, np.full(20000, NEG_INF, np.float32), np.random.default_rng(0))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bias_past_float32_makes_its_token_the_one(temperature):
    """A finite logit_bias past float32's range (1.8e308, valid JSON and a valid request) overflows to +inf:
    that token is drawn, not a 'logits contain +inf' error (issue 26, found by schemathesis)."""
    x = np.array([3.0, 1.0, 2.0, 0.5], np.float32)
    s = Sampler(SamplerParams(temperature=temperature, seed=5, logit_bias={1: 1.7976931348623157e308}), 4)
    assert all(s.sample(x) == 1 for _ in range(5))


def test_extreme_penalties_never_make_nan_or_inf():
    """Schema-valid extremes (repeat_penalty 1.5e308, infinite penalties of opposite signs): the penalised
    logits stay finite and ordered as llama.cpp's arithmetic orders them, and a token is still sampled."""
    logits = np.array([2.0, 0.0, -1.0, 3.0, 1.0], np.float32)
    for rp, fp, pp in [(1.5e308, 0.0, 0.0), (1.0, 1e308, -1e308), (0.0, 0.0, 0.0), (1e308, -1e308, 1e308)]:
        _, out = apply_penalties(None, logits, {0: 1, 1: 2, 2: 1}, rp, fp, pp)
        assert np.isfinite(out).all(), (rp, fp, pp, out)
        assert (out[3:] == logits[3:]).all()             # unseen tokens untouched
    _, out = apply_penalties(None, logits, {0: 1, 2: 1}, 1.5e308)
    assert out[0] < logits[4] and out[2] < -1e30         # 2 / 1.5e308 ~ 0 < 1.0; -1 * big: very negative
    s = Sampler(SamplerParams(temperature=0.8, repeat_penalty=1.5e308, seed=1), 20)
    for t in (3, 0, 2):
        s.accept(t)
    assert 0 <= s.sample(np.tile(logits, 4)) < 20
    # a penalty saturated at float32's largest value, then a temperature below 1: the chain's logits
    # overflow to +inf (schemathesis, repeat_penalty 1.4e-45 at temperature 0.8): those tokens are drawn
    s = Sampler(SamplerParams(temperature=0.8, repeat_penalty=1.401298464324817e-45, seed=1), 8)
    for t in (1, 2, 3):
        s.accept(t)
    x = np.array([1.0, 3.0, -2.0, 0.5, 2.0, 1.0, 0.0, -1.0], np.float32)
    assert {s.sample(x) for _ in range(20)} <= {1, 3}      # 3 / 1.4e-45 and 0.5 / 1.4e-45 saturate, then overflow
