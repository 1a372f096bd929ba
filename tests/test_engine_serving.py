"""The engine's serving features on SmolLM2: KV cache types, saved state, context shift, prompt
reuse across sequences, and continuous batching (a decode step of several sequences in one
forward pass gives each what it gets alone)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tinyinfer.engine import ContextError, Engine, StateError
from tinyinfer.sampler import SamplerParams

GREEDY = SamplerParams(temperature=0.0, repeat_penalty=1.0)
PROMPTS = ["One, two, three,", "The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):"]


@pytest.fixture(scope="module")
def eng(smollm2_path):
    return Engine(smollm2_path, n_ctx=256, n_threads=1)


def _ids(e, text):
    return e.tokenizer.encode(text, special=True)


def _greedy(e, text, n, **kw):
    return [s.token for s in e.generate(_ids(e, text), GREEDY, max_tokens=n, ignore_eos=True, **kw)]


def test_cache_types_and_sizes(smollm2_path, eng):
    # SmolLM2-135M: 30 layers, 3 KV heads of 64: f16 = 2 bytes a value (half the old f32 cache)
    assert eng.cache.type_k == eng.cache.type_v == "f16"
    per_cell = 30 * 3 * 64 * 2
    assert eng.cache.nbytes == 256 * per_cell * 2
    e8 = Engine(smollm2_path, n_ctx=256, n_threads=1, type_k="q8_0", type_v="q4_0")
    assert e8.cache.nbytes == 256 * 30 * 3 * 2 * (34 + 18)
    # inspect counts what the engine allocates
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.tools.inspect import analyze
    for e in (eng, e8):
        m = analyze(GGUFFile(smollm2_path), n_ctx=256, type_k=e.cache_type_k, type_v=e.cache_type_v)["memory"]
        assert m["kv_bytes"] == e.cache.nbytes and m["kv"]["type_k"] == e.cache_type_k
    # a quantized cache still answers like the f16 one on an easy prompt
    assert _greedy(e8, "One, two, three,", 4) == _greedy(eng, "One, two, three,", 4)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        Engine(smollm2_path, n_ctx=64, type_k="q5_1")


def test_saved_state_reloads_to_identical_logits(smollm2_path, eng, tmp_path):
    ids = _ids(eng, "The quick brown fox jumps over the lazy dog. The quick brown")
    eng.reset()
    eng.eval(ids)
    blob = eng.save_state()
    nxt = int(np.argmax(eng.scores[-1]))
    want = eng.eval([nxt]).copy()
    other = Engine(smollm2_path, n_ctx=256, n_threads=1)
    other.eval(_ids(other, "Something else entirely"))          # a different context before loading
    other.load_state(blob)
    assert other.tokens == list(ids)
    assert int(np.argmax(other.scores[-1])) == nxt
    np.testing.assert_array_equal(other.eval([nxt]), want)
    # a file, as --prompt-cache writes it
    path = tmp_path / "state.bin"
    eng.reset()
    eng.eval(ids)
    eng.save_state_file(path)
    other.load_state_file(path)
    np.testing.assert_array_equal(other.eval([nxt]), want)
    # damaged or foreign: a clear error, an empty context
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x55
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum"):
        other.load_state_file(bad)
    assert other.tokens == []
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(StateError, match="bad.bin"):
        other.load_state_file(bad)
    bad.write_bytes(b"not a state at all")
    with pytest.raises(StateError, match="bad magic"):
        other.load_state_file(bad)
    q8 = Engine(smollm2_path, n_ctx=256, n_threads=1, type_k="q8_0")
    with pytest.raises(StateError, match="type_k"):
        q8.load_state_file(path)
    small = Engine(smollm2_path, n_ctx=8, n_threads=1)
    with pytest.raises(StateError, match="more than this context"):
        small.load_state(blob)


def test_cli_prompt_cache(smollm2_path, tmp_path, capfd):
    from tinyinfer.cli import main
    cache = tmp_path / "prompt.cache"
    args = ["-m", str(smollm2_path), "-p", "One, two, three,", "-n", "4", "--temp", "0", "-c", "128", "-t", "1",
            "--prompt-cache", str(cache), "--no-perf"]
    assert main(args) == 0
    first = capfd.readouterr()
    assert cache.exists()
    assert main(args) == 0
    second = capfd.readouterr()
    assert second.out == first.out and "cached tokens" in second.err
    cache.write_bytes(cache.read_bytes()[:-10])
    assert main(args) == 1
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "corrupted" in err and str(cache) in err


def _shift_run(e, n_gen):
    steps = list(e.generate(_ids(e, "Once upon a time"), GREEDY, max_tokens=n_gen, ignore_eos=True,
                            context_shift=True, n_keep=-1))
    return steps


def test_context_shift_runs_past_the_context(smollm2_path):
    e = Engine(smollm2_path, n_ctx=96, n_threads=1)
    steps = _shift_run(e, 300)                         # three shifts and more
    assert len(steps) == 300 and steps[-1].finish_reason == "length"
    assert len(e.tokens) <= 96
    prompt = _ids(e, "Once upon a time")
    assert e.tokens[:len(prompt)] == prompt            # n_keep = -1: the prompt stays
    # without it the generation stops at the context's end
    steps = list(e.generate(prompt, GREEDY, max_tokens=300, ignore_eos=True))
    assert len(steps) == 96 - len(prompt) + 1 and steps[-1].finish_reason == "length"   # the last one unevaluated


def test_context_shift_rerotates_the_kept_keys(smollm2_path):
    """After a shift, layer 0's cells (which depend only on each token and its position) hold what
    evaluating the kept tokens afresh at their new positions gives: RoPE re-applied to the keys
    (up to f16 rounding), values moved as they are. (Deeper layers keep what they saw of the dropped
    tokens: that is what a context shift is, in llama.cpp too.)"""
    e = Engine(smollm2_path, n_ctx=128, n_threads=1)
    ids = _ids(e, "The history of the city begins in the Middle Ages, when a small market grew around "
                  "the river crossing. Merchants from the north brought wool and timber, and the town")
    e.eval(ids)
    e.shift_context(n_keep=4, n_discard=10)
    kept = list(e.tokens)
    assert kept == ids[:4] + ids[14:]
    fresh = Engine(smollm2_path, n_ctx=128, n_threads=1)
    fresh.eval(kept)
    n = len(kept)
    np.testing.assert_allclose(e.cache.k[0].to_float(0, 0, n), fresh.cache.k[0].to_float(0, 0, n), atol=2e-2)
    np.testing.assert_array_equal(e.cache.v[0].to_float(0, 0, n), fresh.cache.v[0].to_float(0, 0, n))
    assert not np.allclose(e.cache.k[0].to_float(0, 4, n), _unshifted(smollm2_path, ids)[4:n], atol=2e-2)
    got = e.eval([ids[-1]])
    assert np.isfinite(got).all()


def _unshifted(path, ids):
    f = Engine(path, n_ctx=128, n_threads=1)
    f.eval(ids)
    return f.cache.k[0].to_float(0, 0, len(ids))[np.r_[0:4, 14:len(ids)]]


@pytest.mark.slow
def test_context_shift_2000_tokens_in_512(smollm2_path):
    e = Engine(smollm2_path, n_ctx=512, n_threads=1)
    steps = _shift_run(e, 2000)
    assert len(steps) == 2000 and steps[-1].finish_reason == "length"


def test_batched_decoding_equals_solo_runs(smollm2_path):
    """Four sequences generating at once from four threads (one forward pass per step for all of
    them) give exactly the greedy tokens each gives alone."""
    e = Engine(smollm2_path, n_ctx=256, n_threads=1, n_seq=4)
    engines = [e] + [e.fork(seq=i) for i in range(1, 4)]
    solo = {p: _greedy(e, p, 24) for p in PROMPTS}
    got = {}
    barrier = threading.Barrier(4)

    def run(k):
        barrier.wait()
        got[PROMPTS[k]] = _greedy(engines[k], PROMPTS[k], 24)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == solo
    assert e.batcher.max_batch >= 2                    # they did share forward passes


def test_step_trace_sums_up(smollm2_path, tmp_path, monkeypatch):
    """TINYINFER_STEP_TRACE's timeline (tinyinfer/batcher.py) of two sequences decoding at once, and
    benchmarks/bench_serving.py's summary of it: passes of two rows, each row back after its pass."""
    import sys
    import time
    from pathlib import Path
    from tinyinfer import batcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_serving import step_timeline
    path = tmp_path / "steps.txt"
    e = Engine(smollm2_path, n_ctx=128, n_threads=1, n_seq=2)
    f = e.fork(seq=1)
    with open(path, "a", buffering=1) as fh:
        monkeypatch.setattr(batcher, "_TRACE", fh)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=_greedy, args=(x, p, 6)) for x, p in ((e, PROMPTS[0]), (f, PROMPTS[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        t1 = time.perf_counter()
    lines = path.read_text().splitlines()
    runs = [ln.split() for ln in lines if ln.startswith("R ")]
    assert runs and sum(int(r[3]) for r in runs) == sum(ln.startswith("A ") for ln in lines)
    assert max(int(r[3]) for r in runs) == 2 and all(float(r[1]) <= float(r[2]) for r in runs)
    summary = step_timeline(path, t0, t1)
    assert f"{len(runs)} passes" in summary and "a row back" in summary


def test_prompt_chunk_shares_the_decode_pass(smollm2_path):
    """A slot's prompt runs in the same forward pass as another sequence's decode token (each weight
    read once for both, as llama-server mixes them); with the batch-invariant kernels both logits rows
    are bit-identical to each run alone."""
    from tinyinfer.batcher import _Request
    from tinyinfer.kernels.matmul import KernelConfig, using_config
    with using_config(KernelConfig(batch_invariant=True)):
        e = Engine(smollm2_path, n_ctx=128, n_threads=1, n_seq=2)
    f = e.fork(seq=1)
    a, b = _ids(e, PROMPTS[2]), _ids(e, PROMPTS[3])
    e.eval(a[:-1])
    solo_a = e.eval(a[-1:]).copy()          # sequence 0's next token, alone
    solo_b = f.eval(b).copy()               # sequence 1's prompt, alone
    del e.tokens[-1:]
    f.tokens = []
    reqs = [_Request(e, np.array(a[-1:]), len(a) - 1, 1, False), _Request(f, np.array(b), 0, 1, False)]
    steps = e.batcher.n_steps
    e.batcher._run(reqs)
    assert e.batcher.n_steps == steps + 1                # one pass for both
    assert all(r.done and r.error is None for r in reqs)
    np.testing.assert_array_equal(reqs[0].result[0], solo_a)
    np.testing.assert_array_equal(reqs[1].result[0], solo_b)


def test_prompt_reused_from_a_free_sequence(smollm2_path):
    e = Engine(smollm2_path, n_ctx=256, n_threads=1, n_seq=2)
    f = e.fork(seq=1)
    base = "You are a helpful assistant. Answer briefly. Question: what is the capital of"
    _greedy(f, base + " Italy?", 2)                     # sequence 1 holds the shared prefix
    list(e.generate(_ids(e, base + " Spain?"), GREEDY, max_tokens=1))
    n_prefix = len(_ids(e, base))
    assert e.timings.n_prompt <= len(_ids(e, base + " Spain?")) - n_prefix + 1   # only the new tail
    reused = e.eval([13]).copy()
    fresh = Engine(smollm2_path, n_ctx=256, n_threads=1)
    fresh.eval(list(e.tokens[:-1]))
    np.testing.assert_allclose(reused, fresh.eval([13]), rtol=0, atol=1e-4)
    with pytest.raises(ContextError):
        e.ingest_prompt([])
