"""The expander mask: which ``d`` model dims each of ``n`` latents may use.

This module is the single source of the mask. The algorithm (``expander-v1``, specified in
``docs/FORMAT.md``) depends only on ``(m, n, d, seed)`` and 64-bit integer arithmetic, so the
same mask comes out on every platform and every numpy/torch version:

1. ``R = ceil(n*d / m)`` rounds. Round ``r`` is a permutation of ``0..m-1``: the dims sorted by
   the key ``splitmix64(seed, r*m + p)`` of dim ``p`` (ties broken by ``p``).
2. The rounds are concatenated into one stream; latent ``i`` takes stream entries
   ``i*d .. i*d+d-1``. Every dim thus appears ``floor(nd/m)`` or ``ceil(nd/m)`` times.
3. A latent that straddles two rounds may repeat a dim. Each repeated entry in the head of the
   later round is swapped with the first later entry of that round that is not in the latent's
   tail; swaps stay within one round, so the degrees stay balanced.
4. Each latent's ``d`` dims are sorted ascending.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import SaeCompressError

MASK_ALGORITHM = "expander-v1"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection on uint64), applied elementwise in place."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def splitmix64(seed: int, count: int) -> np.ndarray:
    """Counter-based SplitMix64 outputs ``mix64(mix64(seed) + (c + 1) * golden)`` for ``c < count``."""
    state = _mix64(np.array([seed], dtype=np.uint64))
    z = np.arange(1, count + 1, dtype=np.uint64)
    z *= _GOLDEN
    z += state
    return _mix64(z)


def _check(m: int, n: int, d: int, seed: int) -> None:
    for name, value in (("m", m), ("n", n), ("d", d), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise SaeCompressError(f"expander mask: {name} must be an integer, got {value!r}")
    if m < 1 or n < 1:
        raise SaeCompressError(f"expander mask: need m >= 1 and n >= 1, got m={m}, n={n}")
    if not 1 <= d <= m:
        raise SaeCompressError(
            f"expander mask: degree d={d} must be between 1 and the model dim m={m}; "
            "choose a smaller --d"
        )
    if seed < 0 or seed >= 2**63:
        raise SaeCompressError(f"expander mask: seed must be in [0, 2**63), got {seed}")


def _rounds(m: int, count: int, seed: int) -> np.ndarray:
    """``count`` seeded permutations of ``0..m-1``, shape ``[count, m]`` (int64).

    Dim ``p`` of round ``r`` gets the key ``splitmix64(seed, r*m + p)`` with its low ``b`` bits
    replaced by ``p`` (``b`` = bits needed for ``m - 1``): keys are then distinct, ties in the
    hash are broken by ``p``, and a plain (fast, unstable) sort gives the one defined order.
    """
    bits = np.uint64(max(1, (m - 1).bit_length()))
    keys = splitmix64(seed, count * m).reshape(count, m)
    keys >>= bits
    keys <<= bits
    keys |= np.arange(m, dtype=np.uint64)
    keys.sort(axis=1)
    keys &= (np.uint64(1) << bits) - np.uint64(1)
    return keys.view(np.int64)


def expander_mask(m: int, n: int, d: int, seed: int = 0) -> np.ndarray:
    """Row indices of a left-``d``-regular, right-balanced bipartite mask, shape ``[n, d]`` (int64).

    Row ``i`` holds the ``d`` distinct model dims latent ``i`` uses, ascending. Deterministic in
    ``(m, n, d, seed)``; see the module docstring and ``docs/FORMAT.md``.
    """
    _check(m, n, d, seed)
    m, n, d, seed = int(m), int(n), int(d), int(seed)
    total = n * d
    num_rounds = -(-total // m)
    stream = _rounds(m, num_rounds, seed).reshape(-1)
    for r in range(1, num_rounds):
        boundary = r * m
        tail_len = boundary % d
        if tail_len == 0 or boundary >= total:
            continue
        tail = set(stream[boundary - tail_len : boundary].tolist())
        head_len = d - tail_len
        candidate = boundary + head_len
        for q in range(boundary, boundary + head_len):
            if int(stream[q]) not in tail:
                continue
            while int(stream[candidate]) in tail:
                candidate += 1
            stream[q], stream[candidate] = stream[candidate], stream[q]
            candidate += 1
    indices = stream[:total].reshape(n, d)
    indices.sort(axis=1)
    return indices


def indices_sha256(indices: np.ndarray) -> str:
    """sha256 (hex) of an index array as little-endian int32, row-major: the mask's fingerprint."""
    data = np.ascontiguousarray(np.asarray(indices), dtype="<i4")
    return hashlib.sha256(data.tobytes()).hexdigest()
