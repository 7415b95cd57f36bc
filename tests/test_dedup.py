"""distcls.dedup: first occurrences over a stream of chunks, exact also when hashes collide."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from distcls.dedup import Distinct, KeySet, Seen, hash64


def _first_occurrences(chunks: list[list[str]], distinct: Distinct) -> list[str]:
    arrays = [pa.array(chunk, pa.string()) for chunk in chunks]
    kept = [value for array in arrays for value in array.filter(pa.array(distinct.keep(array))).to_pylist()]
    return kept + distinct.collided(lambda: iter(arrays)).to_pylist()


def test_each_value_once_across_chunks_first_occurrence_first() -> None:
    chunks = [["a", "b", "a"], ["c", "b"], ["d", "a", "c"]]
    assert _first_occurrences(chunks, Distinct()) == ["a", "b", "c", "d"]


def test_values_that_only_share_a_hash_are_all_kept() -> None:
    """A hash that maps every value to its length: "ab" and "cd" collide, and so do "x" and "y";
    the first pass drops them, the exact re-check brings each distinct value back once."""
    by_length = Distinct(hash_fn=lambda values: np.array([len(v) for v in values.to_pylist()], np.uint64))
    kept = _first_occurrences([["ab", "x"], ["cd", "ab", "y"], ["cd", "x", "ef"]], by_length)
    assert sorted(kept) == ["ab", "cd", "ef", "x", "y"] and kept[:2] == ["ab", "x"]


def test_the_hash_set_grows_in_sorted_levels_and_finds_every_member() -> None:
    seen = Seen()
    hashes = hash64(pa.array([f"s3://bucket/{i}.jpg" for i in range(5000)]))
    for start in range(0, 5000, 300):
        seen.add(hashes[start:start + 300])
    assert len(seen) == 5000 and seen.contains(hashes).all()
    assert not seen.contains(hash64(pa.array(["s3://bucket/5000.jpg"]))).any()


def test_a_key_set_holds_what_was_added_and_nothing_else() -> None:
    keys = KeySet()
    keys.add(pa.array(["a\x001\x002", "b\x00-1\x00-1"]))
    assert keys.contains(pa.array(["b\x00-1\x00-1", "a\x001\x003", "a\x001\x002"])).tolist() == [True, False, True]
