"""
Benchmark problems for the demo genetic algorithm: what it needs from one, and two of them.

:class:`OneMax` evolves bit strings, :class:`Rastrigin` real vectors; both satisfy the
:class:`Problem` protocol the algorithm in :mod:`.ga` runs on. Fitness is always maximised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

if TYPE_CHECKING:
    import random
    from collections.abc import Iterator, Sequence

__all__ = ("OneMax", "Problem", "Rastrigin")

G = TypeVar("G")


def _mutation_sites(length: int, rate: float, rng: random.Random) -> Iterator[int]:
    """
    Yield the indices in ``range(length)`` hit with probability ``rate`` each, in order.
    """
    if rate <= 0.0:
        return
    if rate >= 1.0:
        yield from range(length)
        return
    log_miss = math.log1p(-rate)
    index = -1
    while True:  # the gap to the next hit is geometrically distributed
        index += 1 + int(math.log(1.0 - rng.random()) / log_miss)
        if index >= length:
            return
        yield index


class Problem(Protocol[G]):
    """
    What the algorithm needs from a problem whose genomes are lists of ``G``.
    """

    @property
    def name(self) -> str:
        """
        A short identifier such as ``"onemax"``.
        """

    @property
    def optimum(self) -> float:
        """
        The best reachable fitness.
        """

    def random_genome(self, rng: random.Random) -> list[G]:
        """
        Return a uniformly random genome.
        """

    def fitness(self, genome: list[G]) -> float:
        """
        Return the fitness of ``genome`` (higher is better).
        """

    def mutate(self, genome: list[G], rate: float, rng: random.Random) -> list[G]:
        """
        Return a mutated copy of ``genome``; each gene changes with probability ``rate``.
        """

    def crossover(self, a: list[G], b: list[G], rng: random.Random) -> tuple[list[G], list[G]]:
        """
        Return two new children recombined from ``a`` and ``b`` (left unmodified).
        """

    def diversity(self, population: Sequence[list[G]]) -> float:
        """
        Return the genetic diversity of ``population``, normalised to ``[0, 1]``.
        """


@dataclass(frozen=True, slots=True)
class OneMax:
    """
    Bit strings of ``length`` genes; the fitness is the number of ones.

    Crossover is one-point; mutation flips bits. Diversity is the exact mean pairwise
    Hamming distance over the whole population divided by ``length`` (computed from
    per-locus counts of ones in O(population * length), so no sampling is needed).
    """

    length: int
    name: ClassVar[str] = "onemax"

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")

    @property
    def optimum(self) -> float:
        """
        ``length``: all ones.
        """
        return float(self.length)

    def random_genome(self, rng: random.Random) -> list[int]:
        """
        Return ``length`` fair random bits.
        """
        bits = rng.getrandbits(self.length)
        return [(bits >> i) & 1 for i in range(self.length)]

    def fitness(self, genome: list[int]) -> float:
        """
        Return the number of ones.
        """
        return float(sum(genome))

    def mutate(self, genome: list[int], rate: float, rng: random.Random) -> list[int]:
        """
        Return a copy of ``genome`` with each bit flipped with probability ``rate``.
        """
        child = genome.copy()
        for i in _mutation_sites(len(child), rate, rng):
            child[i] ^= 1
        return child

    def crossover(
        self, a: list[int], b: list[int], rng: random.Random
    ) -> tuple[list[int], list[int]]:
        """
        Return the two one-point crossovers of ``a`` and ``b`` at a random cut.
        """
        if len(a) < 2:
            return a.copy(), b.copy()
        cut = rng.randrange(1, len(a))
        return a[:cut] + b[cut:], b[:cut] + a[cut:]

    def diversity(self, population: Sequence[list[int]]) -> float:
        """
        Return the mean pairwise Hamming distance divided by ``length`` (0 if < 2).
        """
        n = len(population)
        if n < 2:
            return 0.0
        differing = sum(ones * (n - ones) for ones in map(sum, zip(*population, strict=True)))
        return min(1.0, differing / (n * (n - 1) / 2) / self.length)


@dataclass(frozen=True, slots=True)
class Rastrigin:
    """
    Real vectors in ``[-5.12, 5.12]^dimensions``; the fitness is the *negative* Rastrigin.

    Crossover is BLX-0.5; mutation adds Gaussian noise of ``mutation_sigma``. Both clip to
    the bounds. Diversity is the mean per-dimension standard deviation divided by the half
    width of the domain (5.12), the largest standard deviation a bounded gene can have.
    """

    dimensions: int
    mutation_sigma: float = 0.5
    name: ClassVar[str] = "rastrigin"
    optimum: ClassVar[float] = 0.0
    LOWER: ClassVar[float] = -5.12
    UPPER: ClassVar[float] = 5.12

    def __post_init__(self) -> None:
        if self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")

    def random_genome(self, rng: random.Random) -> list[float]:
        """
        Return a point drawn uniformly from the domain.
        """
        return [rng.uniform(self.LOWER, self.UPPER) for _ in range(self.dimensions)]

    def fitness(self, genome: list[float]) -> float:
        """
        Return ``-(10 n + sum(x^2 - 10 cos(2 pi x)))``.
        """
        tau, cos = math.tau, math.cos
        return -(10.0 * len(genome) + sum(x * x - 10.0 * cos(tau * x) for x in genome))

    def mutate(self, genome: list[float], rate: float, rng: random.Random) -> list[float]:
        """
        Return a copy of ``genome`` with Gaussian noise on each gene with probability ``rate``.
        """
        child = genome.copy()
        lower, upper, sigma = self.LOWER, self.UPPER, self.mutation_sigma
        for i in _mutation_sites(len(child), rate, rng):
            child[i] = min(upper, max(lower, child[i] + rng.gauss(0.0, sigma)))
        return child

    def crossover(
        self, a: list[float], b: list[float], rng: random.Random
    ) -> tuple[list[float], list[float]]:
        """
        Return two BLX-0.5 children: each gene uniform in the parents' interval widened by half.
        """
        lower, upper, uniform = self.LOWER, self.UPPER, rng.uniform
        first: list[float] = []
        second: list[float] = []
        for x, y in zip(a, b, strict=True):
            spread = 0.5 * abs(x - y)
            low, high = max(lower, min(x, y) - spread), min(upper, max(x, y) + spread)
            first.append(uniform(low, high))
            second.append(uniform(low, high))
        return first, second

    def diversity(self, population: Sequence[list[float]]) -> float:
        """
        Return the mean per-dimension population standard deviation divided by 5.12.
        """
        n = len(population)
        if n < 2:
            return 0.0
        total = 0.0
        for column in zip(*population, strict=True):
            mean = sum(column) / n
            total += math.sqrt(sum((x - mean) ** 2 for x in column) / n)
        return min(1.0, total / self.dimensions / self.UPPER)
