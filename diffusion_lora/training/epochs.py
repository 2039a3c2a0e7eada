"""One epoch's batches as index arithmetic: an image repeated N times costs nothing until it is drawn.

An epoch shuffles each bucket's samples, cuts them into batches and shuffles the batches across
buckets. Both shuffles are keyed pseudo-random permutations computed per index (a Feistel network
over the next power of four, walked until it lands in range), so memory is proportional to the
number of images, never to the number of samples (images × repeats).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_M64 = 2**64 - 1
_ROUNDS = 6


def _mix(x: int) -> int:
    """SplitMix64's finalizer: a well-mixed 64-bit function of ``x`` (pure integer arithmetic)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random bijection of ``range(n)`` chosen by ``key``, evaluated one index at a time."""

    def __init__(self, n: int, key: int) -> None:
        if n < 0:
            raise ValueError(f"n: {n} must be 0 or more")
        self.n = n
        width = max(1, n - 1).bit_length()
        self.half = (width + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix((key & _M64) ^ _mix(r)) for r in range(_ROUNDS)]

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a permutation of {self.n}")
        x = index
        while True:  # cycle walking: the walk stays on index's cycle, which holds values below n
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


@dataclass(frozen=True)
class BucketSamples:
    """The samples of one bucket: for each of its images, its first sample index and its repeat count."""

    firsts: Sequence[int]
    repeats: Sequence[int]

    def __post_init__(self) -> None:
        ends = [0]
        for r in self.repeats:
            ends.append(ends[-1] + r)
        object.__setattr__(self, "_starts", ends)

    @property
    def total(self) -> int:
        return self._starts[-1]  # type: ignore[attr-defined]

    def sample(self, position: int) -> int:
        """The dataset sample index at ``position`` in ``range(total)`` (images in order, repeats adjacent)."""
        starts = self._starts  # type: ignore[attr-defined]
        image = bisect.bisect_right(starts, position) - 1
        return self.firsts[image] + (position - starts[image])


class EpochBatches(Sequence[list[int]]):
    """One epoch's batches (lists of sample indices, each from one bucket), computed on access.

    ``keys[b]`` shuffles bucket ``b``'s samples and ``order_key`` the batches; every sample is in
    exactly one batch (a bucket's last batch may be smaller).
    """

    def __init__(self, buckets: Sequence[BucketSamples], keys: Sequence[int], order_key: int, batch_size: int) -> None:
        self.buckets = list(buckets)
        self.shuffles = [Permutation(b.total, k) for b, k in zip(self.buckets, keys, strict=True)]
        self.batch_size = batch_size
        ends, total = [], 0
        for b in self.buckets:
            total += -(-b.total // batch_size)
            ends.append(total)
        self.ends = ends
        self.order = Permutation(total, order_key)

    def __len__(self) -> int:
        return self.order.n

    def __getitem__(self, index: int) -> list[int]:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("EpochBatches does not support slices; index one batch at a time")
        if index < 0:
            index += len(self)
        j = self.order(index)
        b = bisect.bisect_right(self.ends, j)
        first = (j - (self.ends[b - 1] if b else 0)) * self.batch_size
        bucket, shuffle = self.buckets[b], self.shuffles[b]
        return [bucket.sample(shuffle(k)) for k in range(first, min(first + self.batch_size, bucket.total))]

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]
