"""Distinct strings over a stream of Arrow chunks in bounded memory: 8 bytes per distinct value.

Millions of paths held as Python strings (or one big Arrow column) would make the driver's memory
grow with the input. Here each value is reduced to a 64-bit hash; a value whose hash was seen before
is dropped. That is exact unless two different values share a hash (about 1 in 10^6 for 5 million
values), so every run that dropped a value re-reads the stream once and compares the strings of the
hashes that repeated: a value dropped for a hash it only shares with another one comes back.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

# Chunks re-readable from the start: the second pass must see the same values in the same order.
Chunks = Callable[[], Iterable[pa.Array]]


def hash64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash (SipHash, pandas' ``hash_array``) of each string; null hashes as ``None``."""
    return pd.util.hash_array(np.asarray(values.to_numpy(zero_copy_only=False), dtype=object), categorize=False)


class Seen:
    """A set of 64-bit hashes as a few sorted numpy arrays whose sizes grow geometrically (as in a
    log-structured merge tree): adding n hashes costs O(n log n) in all, a lookup a binary search
    per array, and memory stays 8 bytes per hash."""

    def __init__(self) -> None:
        self._levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for level in self._levels:
            at = np.minimum(np.searchsorted(level, hashes), len(level) - 1)
            found |= level[at] == hashes
        return found

    def add(self, hashes: np.ndarray) -> None:
        """Add hashes not yet in the set (the caller filters with ``contains``), distinct."""
        if not len(hashes):
            return
        self._levels.append(np.sort(hashes))
        while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
            top = self._levels.pop()
            self._levels[-1] = np.sort(np.concatenate([self._levels[-1], top]), kind="stable")

    def first_new(self, hashes: np.ndarray) -> np.ndarray:
        """The mask of ``hashes`` not seen before nor earlier in ``hashes``; adds them."""
        _, first = np.unique(hashes, return_index=True)
        new = np.zeros(len(hashes), dtype=bool)
        new[first] = True
        new &= ~self.contains(hashes)
        self.add(hashes[new])
        return new


class Distinct:
    """First occurrences over a stream of string chunks: ``keep(values)`` per chunk, in order, then
    ``collided(chunks)`` once at the end for the values a shared hash alone made ``keep`` drop."""

    def __init__(self, hash_fn: Callable[[pa.Array], np.ndarray] = hash64) -> None:
        self.hash_fn = hash_fn
        self._seen = Seen()
        self._dropped: list[np.ndarray] = []

    def keep(self, values: pa.Array) -> np.ndarray:
        """The mask of the rows of ``values`` whose hash was seen neither before nor earlier in them."""
        hashes = self.hash_fn(values)
        keep = self._seen.first_new(hashes)
        if not keep.all():
            self._dropped.append(np.unique(hashes[~keep]))
        return keep

    def remember(self, values: pa.Array) -> None:
        """Add ``values`` known to be distinct from all before (a listing) without filtering them."""
        self._seen.first_new(self.hash_fn(values))

    def contains(self, values: pa.Array) -> np.ndarray:
        """The mask of ``values`` whose hash was kept or remembered (a shared hash passes too)."""
        return self._seen.contains(self.hash_fn(values))

    def collided(self, chunks: Chunks) -> pa.Array:
        """The values ``keep`` dropped only because a different value had their hash (usually none).
        ``chunks()`` must yield what ``keep`` was given, in the same order; it is read again only when
        ``keep`` dropped anything, and then Python strings are made only for rows of repeated hashes."""
        if not self._dropped:
            return pa.array([], pa.string())
        repeated = np.unique(np.concatenate(self._dropped))
        strings: dict[int, set[str]] = {}
        lost: list[str] = []
        for values in chunks():
            hashes = self.hash_fn(values)
            rows = np.flatnonzero(np.isin(hashes, repeated))
            for h, value in zip(hashes[rows].tolist(), values.take(pa.array(rows, pa.int64())).to_pylist()):
                known = strings.setdefault(h, set())
                if value not in known:
                    if known:  # the first value of a hash is the one ``keep`` kept
                        lost.append(value)
                    known.add(value)
        return pa.array(lost, pa.string())


class KeySet:
    """Values (keys of ``--incremental``) as two independent 64-bit hashes each, in two ``Seen``
    sets: a value counts as present when both of its hashes are. A value never added passes only
    if both hashes collide, about n / 2^128 for n values: never, in practice, where a 64-bit hash
    alone would wrongly skip about one input in 10^6 runs of 5 million."""

    _SECOND_KEY = "distcls-keyset-2"  # pandas' hash_key: 16 bytes

    def __init__(self) -> None:
        self._first, self._second = Seen(), Seen()

    def __len__(self) -> int:
        return len(self._first)

    def add(self, values: pa.Array) -> None:
        self._first.first_new(hash64(values))
        self._second.first_new(self._hash2(values))

    def contains(self, values: pa.Array) -> np.ndarray:
        return self._first.contains(hash64(values)) & self._second.contains(self._hash2(values))

    def _hash2(self, values: pa.Array) -> np.ndarray:
        return pd.util.hash_array(np.asarray(values.to_numpy(zero_copy_only=False), dtype=object),
                                  hash_key=self._SECOND_KEY, categorize=False)
