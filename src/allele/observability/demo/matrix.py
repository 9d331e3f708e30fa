"""
The demo experiment: the genetic algorithm run over a small matrix of configurations.

For each problem, one *parent* run describes the matrix and one *child* run per
(``population_size``, ``mutation_rate``) cell logs every GA knob as a param and the
per-generation statistics as metrics (``step`` is the generation). When a cell ends, its
result is tagged on the child and summarised as metrics on the parent; when a problem
ends, the matrix results go to the parent as ``summary.json``.

:func:`run_matrix` with ``tracker=None`` runs the very same matrix without a single
observability call (benchmarks compare both); :func:`run_demo` is the tracked run the
``allele-obs demo`` command makes.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ga import GAConfig, GenerationStats, GeneticAlgorithm
from .problems import OneMax, Problem, Rastrigin

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._core.accounting import Statistics
    from .._core.observability import Observability
    from .._core.runs import Run

__all__ = (
    "DEFAULT_GENERATIONS",
    "PROBLEMS",
    "CellResult",
    "DemoResult",
    "make_problem",
    "run_demo",
    "run_matrix",
)

#: generations per cell when none are given (the whole demo then takes about 10 s)
DEFAULT_GENERATIONS = 200
#: the problems the demo knows, by name
PROBLEMS = ("onemax", "rastrigin")
#: genes per OneMax genome
ONEMAX_LENGTH = 64
#: dimensions of the Rastrigin function
RASTRIGIN_DIMENSIONS = 10
#: how close to the optimum a float fitness must come to count as reaching it
OPTIMUM_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class CellResult:
    """
    The outcome of one cell of the matrix (one GA run).

    Args:
        problem: the problem's name.
        cell: the cell's name, such as ``"pop20-mut0.01"``.
        population_size: individuals per generation.
        mutation_rate: per-gene mutation probability.
        best: best fitness over all generations.
        best_generation: first generation that reached ``best``.
        generations_to_optimum: first generation at the optimum, or None if not reached.
        evaluations: fitness evaluations made.
        seconds: wall time of the cell.
    """

    problem: str
    cell: str
    population_size: int
    mutation_rate: float
    best: float
    best_generation: int
    generations_to_optimum: int | None
    evaluations: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DemoResult:
    """
    What :func:`run_demo` did.

    Args:
        parent_run_ids: MLflow run id of each problem's parent run (None: not created).
        child_run_ids: MLflow run id of each cell, keyed ``"<problem>/<cell>"``.
        best: best fitness of each cell, keyed like ``child_run_ids``.
        cells: every cell's result, in the order they ran.
        flushed: whether everything was delivered within the flush timeout.
        stats: the accounting snapshot taken after the flush.
        elapsed: wall seconds of the whole demo, flush included.
    """

    parent_run_ids: dict[str, str | None]
    child_run_ids: dict[str, str | None]
    best: dict[str, float]
    cells: tuple[CellResult, ...]
    flushed: bool
    stats: Statistics
    elapsed: float

    @property
    def runs(self) -> int:
        """The number of runs the demo opened (parents and children)."""
        return len(self.parent_run_ids) + len(self.child_run_ids)


def make_problem(name: str) -> Problem[Any]:
    """
    Return the demo's instance of the problem called ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`PROBLEMS`.
    """
    if name == "onemax":
        return OneMax(ONEMAX_LENGTH)
    if name == "rastrigin":
        return Rastrigin(RASTRIGIN_DIMENSIONS)
    raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")


def _problem_params(problem: Problem[Any]) -> dict[str, Any]:
    """Return the params that describe ``problem`` (its name and genome shape)."""
    if isinstance(problem, OneMax):
        return {"problem": problem.name, "genome_length": problem.length}
    if isinstance(problem, Rastrigin):
        return {
            "problem": problem.name,
            "genome_length": problem.dimensions,
            "dimensions": problem.dimensions,
            "mutation_sigma": problem.mutation_sigma,
        }
    return {"problem": problem.name}


def _cell_name(population_size: int, mutation_rate: float) -> str:
    return f"pop{population_size}-mut{mutation_rate:g}"


class _TrackedGA(GeneticAlgorithm[Any]):
    """The GA with its evaluation step marked as the ``evaluation`` phase."""

    def __init__(self, problem: Problem[Any], config: GAConfig, obs: Observability) -> None:
        super().__init__(problem, config)
        self._obs = obs

    def evaluate_population(self) -> list[float]:
        """
        Evaluate the new individuals inside ``obs.phase("evaluation")``.
        """
        with self._obs.phase("evaluation"):
            return super().evaluate_population()


class _Cell:
    """Follows one GA run: the best-so-far and when the optimum was first reached."""

    def __init__(self, problem: Problem[Any]) -> None:
        self.optimum = problem.optimum
        self.best = -math.inf
        self.best_generation = 0
        self.generations_to_optimum: int | None = None

    def observe(self, stats: GenerationStats[Any]) -> None:
        if stats.best > self.best:
            self.best, self.best_generation = stats.best, stats.generation
        if self.generations_to_optimum is None and (stats.best >= self.optimum - OPTIMUM_TOLERANCE):
            self.generations_to_optimum = stats.generation


def _run_cell(
    problem: Problem[Any], config: GAConfig, tracker: Observability | None
) -> tuple[_Cell, int]:
    """Run one GA to the end; with a tracker, log each generation. Returns (cell, evals)."""
    cell = _Cell(problem)
    if tracker is None:
        ga: GeneticAlgorithm[Any] = GeneticAlgorithm(problem, config)
        last = ga.run(cell.observe)
        return cell, last.evaluations
    ga = _TrackedGA(problem, config, tracker)
    phase, metrics = tracker.phase, tracker.metrics
    stats: GenerationStats[Any] | None = None
    champion: str | None = None
    for _ in range(config.generations):
        with phase("generation"):
            stats = ga.step()
        cell.observe(stats)
        if stats.generation == 0 or stats.improved:
            # Each new best genome becomes a version of the registered model named after
            # the problem; its parent is the previous best, so lineage follows the climb.
            champion = tracker.genome(
                stats.best_genome,
                name=f"{problem.name}-genome",
                fitness=stats.best,
                generation=stats.generation,
                parents=[champion] if champion else [],
            )
        metrics(
            {
                "fitness.best": stats.best,
                "fitness.mean": stats.mean,
                "fitness.worst": stats.worst,
                "fitness.std": stats.std,
                "diversity": stats.diversity,
                "evaluations": stats.evaluations,
                "stagnation": stats.stagnation,
            },
            step=stats.generation,
        )
    assert stats is not None  # GAConfig guarantees generations >= 1
    return cell, stats.evaluations


def _tag_cell_result(tracker: Observability, result: CellResult) -> None:
    """Tag the current (child) run with the result of its cell."""
    tracker.tag("result.best", repr(result.best))
    tracker.tag("result.best_generation", result.best_generation)
    tracker.tag("result.reached_optimum", str(result.generations_to_optimum is not None).lower())
    if result.generations_to_optimum is not None:
        tracker.tag("result.generations_to_optimum", result.generations_to_optimum)
    tracker.tag("result.evaluations", result.evaluations)


def run_matrix(
    tracker: Observability | None = None,
    *,
    problems: Sequence[str] = PROBLEMS,
    population_sizes: Sequence[int] = (20, 50),
    mutation_rates: Sequence[float] = (0.01, 0.05),
    generations: int = DEFAULT_GENERATIONS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    artifact_dir: Path | None = None,
    runs: dict[str, Run] | None = None,
) -> list[CellResult]:
    """
    Run the GA once per (problem, population size, mutation rate).

    Args:
        tracker: where to log; None runs the same matrix without any observability call.
        problems: problem names (see :data:`PROBLEMS`).
        population_sizes: the matrix's first axis.
        mutation_rates: the matrix's second axis.
        generations: generations per cell.
        seed: seed of every cell (common random numbers across the matrix).
        progress: called with one line of text after each cell.
        artifact_dir: where each problem's ``summary.json`` is written and logged from
            (it must stay in place until the tracker is flushed); None logs no summary.
        runs: filled with the :class:`Run` of each parent (key: problem) and child (key:
            ``"<problem>/<cell>"``) when tracked.

    Returns:
        The result of every cell, in the order they ran.

    Raises:
        ValueError: an unknown problem or an invalid GA configuration.
    """
    results: list[CellResult] = []
    for name in problems:
        problem = make_problem(name)
        configs = [
            GAConfig(population_size=size, mutation_rate=rate, generations=generations, seed=seed)
            for size in population_sizes
            for rate in mutation_rates
        ]
        if tracker is None:
            results.extend(_cell_result(problem, config, None, progress) for config in configs)
            continue
        defaults = configs[0] if configs else GAConfig(generations=generations, seed=seed)
        matrix_params = {
            **_problem_params(problem),
            "population_sizes": ",".join(map(str, population_sizes)),
            "mutation_rates": ",".join(f"{r:g}" for r in mutation_rates),
            "cells": len(configs),
            "generations": generations,
            "seed": seed,
            "crossover_rate": defaults.crossover_rate,
            "tournament_size": defaults.tournament_size,
            "elitism": defaults.elitism,
        }
        with tracker.run(
            f"{name}-matrix", experiment=name, params=matrix_params, tags={"suite": "demo"}
        ) as parent:
            if runs is not None:
                runs[name] = parent
            problem_results: list[CellResult] = []
            for config in configs:
                cell = _cell_name(config.population_size, config.mutation_rate)
                with tracker.run(
                    cell,
                    params={**asdict(config), **_problem_params(problem)},
                    tags={"suite": "demo", "cell": cell},
                ) as child:
                    if runs is not None:
                        runs[f"{name}/{cell}"] = child
                    result = _cell_result(problem, config, tracker, progress)
                    _tag_cell_result(tracker, result)
                summary = {f"best.{cell}": result.best, f"evaluations.{cell}": result.evaluations}
                if result.generations_to_optimum is not None:
                    summary[f"generations_to_optimum.{cell}"] = result.generations_to_optimum
                tracker.metrics(summary, step=0)
                problem_results.append(result)
            best = max(problem_results, key=lambda r: (r.best, -r.best_generation), default=None)
            if best is not None:
                tracker.metric("best", best.best, step=0)
                tracker.tag("result.best_cell", best.cell)
            if artifact_dir is not None:
                tracker.artifact(_write_summary(artifact_dir, name, problem_results))
            results.extend(problem_results)
    return results


def _cell_result(
    problem: Problem[Any],
    config: GAConfig,
    tracker: Observability | None,
    progress: Callable[[str], None] | None,
) -> CellResult:
    start = time.perf_counter()
    cell, evaluations = _run_cell(problem, config, tracker)
    result = CellResult(
        problem=problem.name,
        cell=_cell_name(config.population_size, config.mutation_rate),
        population_size=config.population_size,
        mutation_rate=config.mutation_rate,
        best=cell.best,
        best_generation=cell.best_generation,
        generations_to_optimum=cell.generations_to_optimum,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
    )
    if progress is not None:
        reached = (
            f"optimum at generation {result.generations_to_optimum}"
            if result.generations_to_optimum is not None
            else f"optimum {problem.optimum:g} not reached"
        )
        progress(
            f"{result.problem:<9} {result.cell:<14} best {result.best:>9.4g} "
            f"({reached}) in {result.seconds:.2f} s"
        )
    return result


def _write_summary(directory: Path, problem: str, results: Sequence[CellResult]) -> Path:
    """Write the matrix results of ``problem`` to ``<directory>/<problem>/summary.json``."""
    folder = directory / problem
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    document = {"problem": problem, "cells": [asdict(r) for r in results]}
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def run_demo(
    obs: Observability,
    *,
    problems: Sequence[str] = PROBLEMS,
    population_sizes: Sequence[int] = (20, 50),
    mutation_rates: Sequence[float] = (0.01, 0.05),
    generations: int = DEFAULT_GENERATIONS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    flush_timeout: float = 30.0,
) -> DemoResult:
    """
    Run the matrix tracked into ``obs``, then flush and take the accounting snapshot.

    Args:
        obs: where to log (started if it is not yet).
        problems: problem names (see :data:`PROBLEMS`).
        population_sizes: the matrix's first axis.
        mutation_rates: the matrix's second axis.
        generations: generations per cell.
        seed: seed of every cell.
        progress: called with one line of text after each cell.
        flush_timeout: seconds to wait for delivery at the end.

    Returns:
        The run ids, each cell's best fitness, the stats after the flush and the time.
    """
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="allele-demo-") as tmp:
        cells = run_matrix(
            obs,
            problems=problems,
            population_sizes=population_sizes,
            mutation_rates=mutation_rates,
            generations=generations,
            seed=seed,
            progress=progress,
            artifact_dir=Path(tmp),
            runs=runs,
        )
        flushed = obs.flush(timeout=flush_timeout)  # summary.json is read by the exporter
    return DemoResult(
        parent_run_ids={k: r.wait_created(0) for k, r in runs.items() if "/" not in k},
        child_run_ids={k: r.wait_created(0) for k, r in runs.items() if "/" in k},
        best={f"{c.problem}/{c.cell}": c.best for c in cells},
        cells=tuple(cells),
        flushed=flushed,
        stats=obs.stats(),
        elapsed=time.perf_counter() - start,
    )
