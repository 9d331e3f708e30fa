"""
A small, fast, generational genetic algorithm in pure Python (standard library only).

Each generation the population is evaluated (elites keep their cached fitness), then the
next one is bred: ``elitism`` best individuals are copied unchanged, the rest are children
of pairs of parents picked by tournament selection, recombined with probability
``crossover_rate`` and mutated gene by gene with probability ``mutation_rate`` (mutation
sites are drawn by geometric skipping, so low rates cost almost nothing). Fitness is always
maximised. Everything random flows from one ``random.Random(seed)``: a seed fixes the run.
The problems it runs on are in :mod:`.problems` (re-exported here).

Every individual gets an integer id. A child's parents are the ids of the individuals it
was bred from (two after crossover, one otherwise); an elite is the *same* individual
carried over, so it keeps its id and its birth parents. Lineage therefore has no
self-loops, and an id's parents never change.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from .problems import OneMax, Problem, Rastrigin

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = (
    "GAConfig",
    "GenerationStats",
    "GeneticAlgorithm",
    "OneMax",
    "Problem",
    "Rastrigin",
)

G = TypeVar("G")


@dataclass(frozen=True, slots=True)
class GAConfig:
    """
    The parameters of a run.

    Args:
        population_size: individuals per generation (>= 2).
        mutation_rate: per-gene mutation probability in ``[0, 1]``.
        crossover_rate: probability that a pair of parents is recombined, in ``[0, 1]``.
        tournament_size: contestants per tournament (>= 1; 1 is random selection).
        elitism: best individuals copied unchanged into the next generation.
        generations: generations produced by :meth:`GeneticAlgorithm.run` (>= 1).
        seed: seed of the run's only random number generator.
    """

    population_size: int = 100
    mutation_rate: float = 0.02
    crossover_rate: float = 0.9
    tournament_size: int = 3
    elitism: int = 2
    generations: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "population_size >= 2": self.population_size >= 2,
            "0 <= mutation_rate <= 1": 0.0 <= self.mutation_rate <= 1.0,
            "0 <= crossover_rate <= 1": 0.0 <= self.crossover_rate <= 1.0,
            "tournament_size >= 1": self.tournament_size >= 1,
            "0 <= elitism < population_size": 0 <= self.elitism < self.population_size,
            "generations >= 1": self.generations >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid GAConfig {self}: need {', '.join(failed)}")


@dataclass(frozen=True, slots=True)
class GenerationStats(Generic[G]):
    """
    What one generation looked like.

    Args:
        generation: 0 for the random initial population, then 1, 2, ...
        best: highest fitness in this generation.
        mean: mean fitness (always between ``worst`` and ``best``).
        worst: lowest fitness.
        std: population standard deviation of the fitness.
        diversity: the problem's genetic diversity measure, in ``[0, 1]``.
        evaluations: cumulative fitness evaluations; elites are not re-evaluated, so this
            is ``population_size + generation * (population_size - elitism)``.
        best_genome: a copy of the best genome (the first one on ties; elites come first).
        best_id: id of the best individual.
        best_parent_ids: ids of its parents in an earlier generation; ``()`` for the
            initial population. An elite keeps the parents it was born with.
        improved: ``best`` exceeds every earlier generation's best (True at generation 0).
        stagnation: generations since the best-so-far last improved.
    """

    generation: int
    best: float
    mean: float
    worst: float
    std: float
    diversity: float
    evaluations: int
    best_genome: list[G]
    best_id: int
    best_parent_ids: tuple[int, ...]
    improved: bool
    stagnation: int


class GeneticAlgorithm(Generic[G]):
    """
    A generational GA with tournament selection, crossover, mutation and elitism.

    Args:
        problem: what to optimise.
        config: population size, rates, budget and seed.

    The initial population is created at construction; the first :meth:`step` evaluates
    it (generation 0) and every later one breeds and evaluates the next generation.
    """

    def __init__(self, problem: Problem[G], config: GAConfig) -> None:
        self.problem = problem
        self.config = config
        self._rng = random.Random(config.seed)
        self._genomes = [problem.random_genome(self._rng) for _ in range(config.population_size)]
        self._ids = list(range(config.population_size))
        self._parents: list[tuple[int, ...]] = [()] * config.population_size
        self._fitness: list[float | None] = [None] * config.population_size
        self._next_id = config.population_size
        self._evaluations = 0
        self._generation = -1
        self._best_ever = -math.inf
        self._stagnation = 0
        self._last: GenerationStats[G] | None = None

    @property
    def generation(self) -> int:
        """
        Number of the last evaluated generation (-1 before the first :meth:`step`).
        """
        return self._generation

    @property
    def parents_of_best(self) -> tuple[int, ...]:
        """
        Ids of the parents of the last generation's best individual (``()`` if none).
        """
        return self._last.best_parent_ids if self._last is not None else ()

    def evaluate_population(self) -> list[float]:
        """
        Evaluate every individual that has no fitness yet and return all fitness values.

        Override to parallelise, cache or instrument evaluation; the base version calls
        ``problem.fitness`` once per new individual and counts the calls.
        """
        fitness = self.problem.fitness
        for i, value in enumerate(self._fitness):
            if value is None:
                self._fitness[i] = fitness(self._genomes[i])
                self._evaluations += 1
        return [value for value in self._fitness if value is not None]

    def _select(self, fitness: list[float]) -> int:
        """
        Return the index of the fittest of ``tournament_size`` uniformly drawn individuals.
        """
        rand, n = self._rng.random, len(fitness)
        best = int(rand() * n)
        for _ in range(self.config.tournament_size - 1):
            rival = int(rand() * n)
            if fitness[rival] > fitness[best]:
                best = rival
        return best

    def _breed(self, fitness: list[float]) -> None:
        """
        Replace the population by the elites followed by newly bred children.
        """
        cfg, rng, problem = self.config, self._rng, self.problem
        order = sorted(range(len(fitness)), key=fitness.__getitem__, reverse=True)
        elites = order[: cfg.elitism]
        genomes = [self._genomes[i] for i in elites]
        ids = [self._ids[i] for i in elites]
        parents = [self._parents[i] for i in elites]
        scores: list[float | None] = [fitness[i] for i in elites]
        while len(genomes) < cfg.population_size:
            a, b = self._select(fitness), self._select(fitness)
            id_a, id_b = self._ids[a], self._ids[b]
            if rng.random() < cfg.crossover_rate:
                child_a, child_b = problem.crossover(self._genomes[a], self._genomes[b], rng)
                both = (id_a, id_b) if id_a != id_b else (id_a,)
                born = [(child_a, both), (child_b, both)]
            else:
                born = [(self._genomes[a], (id_a,)), (self._genomes[b], (id_b,))]
            for genome, origin in born[: cfg.population_size - len(genomes)]:
                genomes.append(problem.mutate(genome, cfg.mutation_rate, rng))
                ids.append(self._next_id)
                parents.append(origin)
                scores.append(None)
                self._next_id += 1
        self._genomes, self._ids, self._parents, self._fitness = genomes, ids, parents, scores

    def step(self) -> GenerationStats[G]:
        """
        Produce, evaluate and describe the next generation (the initial one on first call).
        """
        if self._generation >= 0:
            fitness = [value for value in self._fitness if value is not None]
            self._breed(fitness)
        self._generation += 1
        fitness = self.evaluate_population()
        n = len(fitness)
        best, worst = max(fitness), min(fitness)
        mean = min(best, max(worst, math.fsum(fitness) / n))
        std = math.sqrt(math.fsum((f - mean) ** 2 for f in fitness) / n)
        improved = best > self._best_ever
        if improved:
            self._best_ever, self._stagnation = best, 0
        else:
            self._stagnation += 1
        top = fitness.index(best)
        self._last = GenerationStats(
            generation=self._generation,
            best=best,
            mean=mean,
            worst=worst,
            std=std,
            diversity=self.problem.diversity(self._genomes),
            evaluations=self._evaluations,
            best_genome=self._genomes[top].copy(),
            best_id=self._ids[top],
            best_parent_ids=self._parents[top],
            improved=improved,
            stagnation=self._stagnation,
        )
        return self._last

    def run(
        self, callback: Callable[[GenerationStats[G]], object] | None = None
    ) -> GenerationStats[G]:
        """
        Step until ``config.generations`` generations exist, calling ``callback`` after each.

        Returns:
            The statistics of the last generation.
        """
        while self._generation < self.config.generations - 1:
            stats = self.step()
            if callback is not None:
                callback(stats)
        assert self._last is not None  # generations >= 1, and step() sets it
        return self._last
