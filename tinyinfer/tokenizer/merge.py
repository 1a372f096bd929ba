"""The merge loop both vocabulary types share: llama.cpp's symbol list and priority queue.

SentencePiece merges the adjacent pair whose joined piece has the highest score, byte-level BPE the
pair with the lowest merge rank; both take the leftmost pair on ties and repeat until nothing
merges. Only the priority of a pair differs, so it is a function argument here.
"""

from __future__ import annotations

import heapq
from typing import Callable, Optional


def merge_symbols(text: str, priority: Callable[[int, int, int], Optional[float]]) -> list:
    """Start from one symbol per character of ``text``; repeatedly merge the adjacent pair with the
    smallest ``priority(a, m, b)`` (merging text[a:m] with text[m:b]; None: cannot merge), leftmost
    first on ties. Return the final symbols, substrings of ``text`` in order.

    Symbol i covers text[i:i+ln[i]] (symbols stay contiguous, a merge grows the left one), so the
    right neighbour of i is i+ln[i]. Queue entries are (priority, left, size); an entry is stale
    when either symbol changed since, i.e. when ln[left] + ln[right] != size.
    """
    n = len(text)
    if n <= 1:
        return [text] if n else []
    ln = [1] * n
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        k = priority(i, i + 1, i + 2)
        if k is not None:
            heap.append((k, i, 2))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, left, size = pop(heap)
        ll = ln[left]
        if ll == 0:
            continue
        r = left + ll
        if r >= n or ln[r] == 0 or ll + ln[r] != size:
            continue
        ln[left] = size
        ln[r] = 0
        rn = left + size
        if rn < n:
            prv[rn] = left
            k = priority(left, rn, rn + ln[rn])
            if k is not None:
                push(heap, (k, left, size + ln[rn]))
        p = prv[left]
        if p >= 0:
            k = priority(p, left, rn)
            if k is not None:
                push(heap, (k, p, rn - p))
    out = []
    i = 0
    while i < n:
        out.append(text[i:i + ln[i]])
        i += ln[i]
    return out
