"""The expander mask: spec conformance (pure-Python re-implementation), test vectors, properties."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saecompress import SaeCompressError, expander_mask
from saecompress.mask import indices_sha256

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
M64 = 2**64


def reference_mask(m: int, n: int, d: int, seed: int) -> list[list[int]]:
    """docs/FORMAT.md §Mask, written out with Python ints only (no numpy)."""

    def mix64(z: int) -> int:
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) % M64
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) % M64
        return z ^ (z >> 31)

    state = mix64(seed)
    bits = max(1, (m - 1).bit_length())
    rounds = -(-n * d // m)
    stream: list[int] = []
    for r in range(rounds):
        keys = []
        for p in range(m):
            h = mix64((state + (r * m + p + 1) * 0x9E3779B97F4A7C15) % M64)
            keys.append(((h >> bits) << bits) | p)
        stream += [key & ((1 << bits) - 1) for key in sorted(keys)]
    for r in range(1, rounds):
        b = r * m
        t = b % d
        if t == 0 or b >= n * d:
            continue
        tail = set(stream[b - t : b])
        c = b + d - t
        for q in range(b, b + d - t):
            if stream[q] in tail:
                while stream[c] in tail:
                    c += 1
                stream[q], stream[c] = stream[c], stream[q]
                c += 1
    return [sorted(stream[i * d : i * d + d]) for i in range(n)]


def format_vectors() -> list[dict]:
    text = FORMAT_MD.read_text()
    block = re.search(r"<!-- test-vectors -->\s*```json\n(.*?)```", text, re.S)
    assert block, "docs/FORMAT.md lost its test-vector block"
    return json.loads(block.group(1))


def test_format_md_vectors_match():
    vectors = format_vectors()
    assert len(vectors) >= 4
    for v in vectors:
        got = expander_mask(v["m"], v["n"], v["d"], v["seed"])
        assert got.tolist() == v["indices"], v
        assert indices_sha256(got) == v["sha256"]


@pytest.mark.parametrize("m,n,d,seed", [(7, 9, 3, 0), (16, 40, 5, 1), (10, 7, 10, 3),
                                        (33, 100, 8, 2**40 + 5), (5, 1, 2, 9), (64, 3, 7, 11)])
def test_numpy_implementation_matches_the_spec(m, n, d, seed):
    assert expander_mask(m, n, d, seed).tolist() == reference_mask(m, n, d, seed)


def _check_properties(mask: np.ndarray, m: int, n: int, d: int) -> None:
    assert mask.shape == (n, d) and mask.dtype == np.int64
    assert mask.min() >= 0 and mask.max() < m
    assert (np.diff(mask, axis=1) > 0).all(), "rows must be strictly ascending (distinct, sorted)"
    counts = np.bincount(mask.ravel(), minlength=m)
    lo, hi = (n * d) // m, -(-n * d // m)
    assert counts.min() >= lo and counts.max() <= hi
    if n * d >= m:
        assert counts.min() >= 1, "every model dim is covered"


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 300), n=st.integers(1, 400), d=st.integers(1, 40), seed=st.integers(0, 2**63 - 1))
def test_mask_properties(m, n, d, seed):
    d = min(d, m)
    mask = expander_mask(m, n, d, seed)
    _check_properties(mask, m, n, d)
    assert np.array_equal(mask, expander_mask(m, n, d, seed))


def test_seeds_give_different_masks_and_large_masks_are_balanced():
    a, b = expander_mask(2048, 4096, 7, 0), expander_mask(2048, 4096, 7, 1)
    assert not np.array_equal(a, b)
    _check_properties(a, 2048, 4096, 7)
    # An expander, not a block pattern: latents share few dims.
    overlap = np.mean([len(set(a[i]) & set(a[i + 1])) for i in range(0, 4000, 2)])
    assert overlap < 0.5


@pytest.mark.parametrize("args,match", [((4, 10, 5, 0), "d=5"), ((4, 10, 0, 0), "d=0"),
                                        ((4, 0, 2, 0), "n=0"), ((4, 10, 2, -1), "seed"),
                                        ((4.0, 10, 2, 0), "m must be an integer")])
def test_impossible_requests_are_clear_errors(args, match):
    with pytest.raises(SaeCompressError, match=match):
        expander_mask(*args)
