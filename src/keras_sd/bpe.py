"""Byte-pair merging: the step of BPE tokenizers that joins a word's symbols into tokens."""

from __future__ import annotations

import heapq
from itertools import pairwise


def merge(symbols: list[str], ranks: dict, merges) -> list[str]:
    """Merge `symbols` as CLIP's BPE does, in O(n log n) in their number.

    CLIP's loop (merge every occurrence of the earliest-learned pair present, left to
    right, until no pair is a merge) is quadratic in a word's length; linked symbols and
    a heap of adjacent pairs by rank make the same merges.

    Args:
        symbols: the word's symbols (characters, the last with its end-of-word mark).
        ranks: merge pair -> rank (lower merges first).
        merges: rank -> pair, the inverse of `ranks`.

    Returns:
        The merged symbols.

    Example:
    >>> pairs = [("a", "b"), ("ab", "c")]
    >>> merge(list("abcab"), {p: i for i, p in enumerate(pairs)}, pairs)
    ['abc', 'ab']
    """
    symbols = list(symbols)
    after, before = [*range(1, len(symbols)), -1], [*range(-1, len(symbols) - 1)]
    heap = [(ranks[p], i) for i, p in enumerate(pairwise(symbols)) if p in ranks]
    heapq.heapify(heap)
    while heap:
        rank, found = heap[0][0], []
        while heap and heap[0][0] == rank:
            found.append(heapq.heappop(heap)[1])
        left, right = merges[rank]
        for i in sorted(found):  # entries whose symbols changed since are stale
            j = after[i]
            if symbols[i] != left or j < 0 or symbols[j] != right:
                continue
            symbols[i], symbols[j] = left + right, None
            after[i] = after[j]
            if after[i] >= 0:
                before[after[i]] = i
            for a, b in ((before[i], i), (i, after[i])):
                if a >= 0 and b >= 0 and (symbols[a], symbols[b]) in ranks:
                    heapq.heappush(heap, (ranks[symbols[a], symbols[b]], a))
    return [s for s in symbols if s is not None]
