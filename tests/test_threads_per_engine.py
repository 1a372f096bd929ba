"""Threads per engine: numba's thread count belongs to the calling thread, so each engine applies
its own before each forward pass (tinyinfer/threads.py), in the thread that runs the pass; two Llama
objects keep theirs. Passes of more than one thread asked for by threads other than the main one all
run on the process's one pass thread (kernels/parallel.py: one OpenMP team)."""

from __future__ import annotations

import threading

import numba
import pytest


def test_two_llamas_keep_their_thread_counts(smollm2_path):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's pool has one thread here (NUMBA_NUM_THREADS=1)")
    from tinyinfer import Llama
    one = Llama(str(smollm2_path), n_ctx=64, n_threads=1, verbose=False)
    two = Llama(str(smollm2_path), n_ctx=64, n_threads=2, verbose=False)
    assert (one.n_threads, two.n_threads) == (1, 2)
    seen = {1: [], 2: []}

    def spy(llm):                      # the count inside the pass, in whichever thread runs it
        model = llm._engine.model
        forward = model.forward

        def fwd(*a, **kw):
            seen[llm.n_threads].append(numba.get_num_threads())
            return forward(*a, **kw)
        model.forward = fwd

    for llm in (one, two):
        spy(llm)
    for llm in (one, two, one, two):   # one after the other, in this thread
        llm.create_completion("Hi", max_tokens=2, temperature=0)
    ts = [threading.Thread(target=lambda m=llm: m.create_completion("Hi", max_tokens=2, temperature=0))
          for llm in (one, two)]       # and in two threads of their own
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen[1] and set(seen[1]) == {1}, seen
    assert seen[2] and set(seen[2]) == {2}, seen


def test_passes_of_other_threads_run_on_one_pass_thread(smollm2_path):
    """libgomp keeps a team of workers per thread that launches parallel regions and stops spinning once
    the teams outnumber the CPUs: a server whose slot threads each led passes paid a sleep and wake per
    region (20 against 14 ms a --parallel 4 step of SmolLM2 on the 2-vCPU VM). Passes asked for by
    several threads run on one thread, not the callers'; the main thread runs its own; an engine of one
    thread (no regions) runs in its caller; an error reaches the caller; the results are the same."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's pool has one thread here (NUMBA_NUM_THREADS=1)")
    from tinyinfer.engine import Engine
    from tinyinfer.kernels.parallel import on_pass_thread, run_pass
    from tinyinfer.sampler import SamplerParams

    eng = Engine(str(smollm2_path), n_ctx=64, n_threads=2)
    single = eng.fork()
    single.n_threads = 1
    ran = []
    forward = eng.model.forward

    def fwd(*a, **kw):
        ran.append((threading.current_thread().name, on_pass_thread(), numba.get_num_threads()))
        return forward(*a, **kw)
    eng.model.forward = fwd
    greedy = SamplerParams(temperature=0)
    ids = eng.tokenizer.encode("The capital of France is", special=True)
    ref = [s.token for s in eng.generate(ids, greedy, max_tokens=4)]
    assert ran and all(r == ("MainThread", False, 2) for r in ran), ran
    ran.clear()
    got, errors = {}, []

    def work(e, name):
        try:
            e.reset()
            got[name] = [s.token for s in e.generate(ids, greedy, max_tokens=4)]
            run_pass(e.n_threads, boom, name)        # an error inside a pass reaches its caller
        except KeyError as exc:
            errors.append((threading.current_thread().name, exc.args[0]))

    def boom(name):
        raise KeyError(f"{name} on {threading.current_thread().name}")

    ts = [threading.Thread(target=work, args=(e, f"caller-{i}"), name=f"caller-{i}")
          for i, e in enumerate([eng.fork(), eng.fork(), single])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == {f"caller-{i}": ref for i in range(3)}, (ref, got)
    assert sorted(errors) == [("caller-0", "caller-0 on tinyinfer-pass"), ("caller-1", "caller-1 on tinyinfer-pass"),
                              ("caller-2", "caller-2 on caller-2")], errors
    two = [r for r in ran if r[2] == 2]
    assert two and {r[:2] for r in two} == {("tinyinfer-pass", True)}, ran     # never the callers' threads
    assert {r for r in ran if r[2] == 1} == {("caller-2", False, 1)}, ran     # one thread: in its caller
