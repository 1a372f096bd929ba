"""Threads per engine: numba's thread count belongs to the calling thread, so each engine applies
its own before each forward pass (tinyinfer/threads.py); two Llama objects keep theirs."""

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

    def spy(llm):
        def proc(tokens, logits):      # runs right after the engine's forward pass, in its thread
            seen[llm.n_threads].append(numba.get_num_threads())
            return logits
        return proc

    for llm in (one, two, one, two):   # one after the other, in this thread
        llm.create_completion("Hi", max_tokens=2, temperature=0, logits_processor=spy(llm))
    ts = [threading.Thread(target=lambda m=llm: m.create_completion("Hi", max_tokens=2, temperature=0,
                                                                     logits_processor=spy(m)))
          for llm in (one, two)]       # and in two threads of their own
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen[1] and set(seen[1]) == {1}, seen
    assert seen[2] and set(seen[2]) == {2}, seen
