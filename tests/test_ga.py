"""Tests of the demo genetic algorithm (`allele.observability.demo.ga`)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

import pytest

from allele.observability.demo.ga import (
    GAConfig,
    GenerationStats,
    GeneticAlgorithm,
    OneMax,
    Problem,
    Rastrigin,
)

ONEMAX = OneMax(64)
RASTRIGIN = Rastrigin(10)
ONEMAX_CONFIG = GAConfig(population_size=100, mutation_rate=1 / 64, generations=100, seed=0)
RASTRIGIN_CONFIG = GAConfig(population_size=100, mutation_rate=0.1, generations=50, seed=0)
CASES = pytest.mark.parametrize(
    ("problem", "config"),
    [(ONEMAX, ONEMAX_CONFIG), (RASTRIGIN, RASTRIGIN_CONFIG)],
    ids=["onemax", "rastrigin"],
)


def run_all(problem: Problem[Any], config: GAConfig) -> list[GenerationStats[Any]]:
    history: list[GenerationStats[Any]] = []
    GeneticAlgorithm(problem, config).run(history.append)
    return history


@CASES
def test_same_seed_gives_identical_runs(problem: Problem[Any], config: GAConfig) -> None:
    """Two runs with the same seed produce identical statistics; another seed differs."""
    first = run_all(problem, config)
    assert first == run_all(problem, config)
    assert first != run_all(problem, dataclasses.replace(config, seed=config.seed + 1))


def test_onemax_reaches_the_optimum() -> None:
    """OneMax(64) with population 100 and rate 1/64 finds all ones within 100 generations."""
    history = run_all(ONEMAX, ONEMAX_CONFIG)
    assert ONEMAX.optimum == 64.0
    assert any(stats.best == ONEMAX.optimum for stats in history)
    assert history[-1].best == 64.0
    assert history[-1].best_genome == [1] * 64


def test_rastrigin_improves() -> None:
    """Rastrigin's best fitness at the end is higher than at generation 0 and at most 0."""
    history = run_all(RASTRIGIN, RASTRIGIN_CONFIG)
    assert history[-1].best > history[0].best
    assert history[-1].best <= RASTRIGIN.optimum


@CASES
def test_elitism_never_loses_the_best(problem: Problem[Any], config: GAConfig) -> None:
    """With elitism the best fitness never decreases and improved/stagnation agree with it."""
    history = run_all(problem, config)
    assert history[0].improved
    assert history[0].stagnation == 0
    for before, after in itertools.pairwise(history):
        assert after.best >= before.best
        assert after.improved == (after.best > before.best)
        assert after.stagnation == (0 if after.improved else before.stagnation + 1)


@CASES
def test_diversity_is_normalised_and_decreases(problem: Problem[Any], config: GAConfig) -> None:
    """Diversity stays within [0, 1] and is lower at the end of a run than at the start."""
    history = run_all(problem, config)
    assert all(0.0 <= stats.diversity <= 1.0 for stats in history)
    assert history[-1].diversity < history[0].diversity


def test_diversity_extremes() -> None:
    """Identical genomes have diversity 0; maximally spread ones reach the top of the range."""
    assert ONEMAX.diversity([[1] * 64] * 10) == 0.0
    assert ONEMAX.diversity([[0] * 64, [1] * 64]) == 1.0
    assert RASTRIGIN.diversity([[1.0] * 10] * 10) == 0.0
    assert RASTRIGIN.diversity([[-5.12] * 10, [5.12] * 10]) == pytest.approx(1.0)


@CASES
def test_stats_are_consistent(problem: Problem[Any], config: GAConfig) -> None:
    """Generations count from 0, worst <= mean <= best, and best matches best_genome."""
    history = run_all(problem, config)
    assert [stats.generation for stats in history] == list(range(config.generations))
    for stats in history:
        assert stats.worst <= stats.mean <= stats.best
        assert stats.std >= 0.0
        assert problem.fitness(stats.best_genome) == stats.best
        if stats.generation == 0:
            assert stats.best_parent_ids == ()
        assert all(parent < stats.best_id for parent in stats.best_parent_ids)


def test_best_genome_is_a_copy() -> None:
    """Mutating the reported best genome does not affect the running population."""
    ga = GeneticAlgorithm(ONEMAX, dataclasses.replace(ONEMAX_CONFIG, generations=3))
    stats = ga.step()
    stats.best_genome.clear()
    assert ga.run().best_genome


@pytest.mark.parametrize("elitism", [0, 1, 5])
def test_evaluation_count(elitism: int) -> None:
    """Evaluations = population_size + generation * (population_size - elitism)."""
    config = dataclasses.replace(ONEMAX_CONFIG, elitism=elitism, generations=20)
    history = run_all(ONEMAX, config)
    for stats in history:
        expected = config.population_size + stats.generation * (config.population_size - elitism)
        assert stats.evaluations == expected
    if elitism == 0:
        assert history[-1].evaluations == config.population_size * config.generations


def test_lineage_points_into_the_previous_generation() -> None:
    """A newborn best's parents were alive a generation before; an elite keeps id and parents."""
    ga = GeneticAlgorithm(ONEMAX, dataclasses.replace(ONEMAX_CONFIG, generations=40))
    assert ga.parents_of_best == ()
    born_with: dict[int, tuple[int, ...]] = {}
    previous: set[int] = set()
    for _ in range(40):
        stats = ga.step()
        assert ga.parents_of_best == stats.best_parent_ids
        if stats.generation == 0:
            assert stats.best_parent_ids == ()
        elif stats.best_id in previous:  # an elite carried over unchanged
            assert stats.best_parent_ids == born_with[stats.best_id]
        else:
            assert 1 <= len(stats.best_parent_ids) <= 2
            assert set(stats.best_parent_ids) <= previous
        born_with.setdefault(stats.best_id, stats.best_parent_ids)
        previous = set(ga._ids)
    assert len(set(ga._ids)) == ONEMAX_CONFIG.population_size


def test_run_completes_the_configured_generations() -> None:
    """run() after some manual steps stops at config.generations and calls back per step."""
    ga = GeneticAlgorithm(RASTRIGIN, dataclasses.replace(RASTRIGIN_CONFIG, generations=10))
    ga.step()
    ga.step()
    seen: list[int] = []
    last = ga.run(lambda stats: seen.append(stats.generation))
    assert seen == list(range(2, 10))
    assert last.generation == ga.generation == 9
    assert ga.run().generation == 9


def test_evaluate_population_is_a_hook() -> None:
    """A subclass overriding evaluate_population sees every generation's evaluation."""

    class Counting(GeneticAlgorithm[int]):
        calls = 0

        def evaluate_population(self) -> list[float]:
            Counting.calls += 1
            return super().evaluate_population()

    Counting(ONEMAX, dataclasses.replace(ONEMAX_CONFIG, generations=7)).run()
    assert Counting.calls == 7


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5, 1.0])
def test_variation_keeps_genomes_valid(seed: int, rate: float) -> None:
    """Crossover and mutation keep length and range and leave their inputs untouched."""
    rng = random.Random(seed)
    a, b = ONEMAX.random_genome(rng), ONEMAX.random_genome(rng)
    a_copy, b_copy = a.copy(), b.copy()
    for child in (*ONEMAX.crossover(a, b, rng), ONEMAX.mutate(a, rate, rng)):
        assert len(child) == 64
        assert set(child) <= {0, 1}
    assert (a, b) == (a_copy, b_copy)
    if rate == 1.0:
        assert ONEMAX.mutate(a, rate, rng) == [1 - bit for bit in a]
    if rate == 0.0:
        assert ONEMAX.mutate(a, rate, rng) == a

    x, y = RASTRIGIN.random_genome(rng), [5.12] * 10
    x_copy = x.copy()
    for real in (*RASTRIGIN.crossover(x, y, rng), RASTRIGIN.mutate(y, rate, rng)):
        assert len(real) == 10
        assert all(Rastrigin.LOWER <= gene <= Rastrigin.UPPER for gene in real)
    assert (x, y) == (x_copy, [5.12] * 10)


def test_fitness_values() -> None:
    """Fitness is the count of ones for OneMax and 0 at the origin for negative Rastrigin."""
    assert ONEMAX.fitness([1, 0, 1, 1] + [0] * 60) == 3.0
    assert RASTRIGIN.fitness([0.0] * 10) == 0.0
    assert RASTRIGIN.fitness([1.0] * 10) == pytest.approx(-10.0)
    assert RASTRIGIN.fitness([1.0] * 10) < RASTRIGIN.optimum


@pytest.mark.parametrize(
    "changes",
    [
        {"population_size": 1},
        {"mutation_rate": 1.5},
        {"crossover_rate": -0.1},
        {"tournament_size": 0},
        {"elitism": 100},
        {"generations": 0},
    ],
)
def test_config_is_validated(changes: dict[str, Any]) -> None:
    """Out-of-range GAConfig values raise ValueError naming the broken rule."""
    with pytest.raises(ValueError, match="need"):
        dataclasses.replace(ONEMAX_CONFIG, **changes)
