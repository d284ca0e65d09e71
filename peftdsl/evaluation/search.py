"""Learned composition weights (`search:`): params optimised without gradients (LoraHub's idea).

An optimiser from nevergrad proposes candidates (values of the searched params, within
their bounds); each candidate is composed and evaluated on the objective's eval and model
only, in memory, on the one loaded base, exactly as a sweep evaluates a grid point
(`sweep.evaluate_point`). Candidates are asked for `batch` at a time and told their
objectives in order, so the sequence of candidates depends on the seed, the batch size and
the values alone: the local executor evaluates a batch in a loop, `--executor ray` as Ray
tasks, and both give the same candidates and the same best point.

The objective is what is minimised or maximised: the eval's value plus the L1 penalty
`l1 · mean |wᵢ|` over the searched params when minimising, minus it when maximising (so
the penalty always favours small weights). The best point is the best candidate
evaluated, ties going to the earliest: never a point the optimiser only predicts.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from peftdsl import ir
from peftdsl.errors import UsageError
from peftdsl.evaluation.sweep import PointJob, evaluate_point

# The recipe's names for nevergrad's optimisers (ngopt picks an algorithm by budget,
# dimension and batch size; CMA is nevergrad's wrapper of the `cma` package).
OPTIMIZERS = {"ngopt": "NGOpt", "cma": "CMA", "random": "RandomSearch"}
EXTRA_HELP = "pip install 'peftdsl[search]'"


@dataclass(frozen=True)
class Candidate:
    step: int  # 1-based, in the order the optimiser asked
    params: dict[str, float]  # the searched params only
    value: float  # the eval's value
    objective: float  # value ± penalty: what was optimised

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "params": dict(self.params), "value": _finite_or_none(self.value),
                "objective": _finite_or_none(self.objective)}


@dataclass(frozen=True)
class SearchOutcome:
    candidates: tuple[Candidate, ...]
    best: dict[str, float]  # the searched params of the best candidate
    goal: str
    pinned: dict[str, float] = field(default_factory=dict)  # `--set` values taken out of the search
    compose_seconds: float = 0.0  # composing candidates (local executor only)
    eval_seconds: float = 0.0  # evaluating them (local executor only)
    seconds: float = 0.0  # the whole search: optimiser, composing and evaluating

    def to_json(self) -> dict[str, Any]:
        """report.json's `search` section (DESIGN §4)."""
        return {"candidates": [c.to_json() for c in self.candidates], "best": dict(self.best)}

    @property
    def best_candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.params == self.best)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def penalised(value: float, weights: Sequence[float], l1: float, goal: str) -> float:
    """The objective: value + l1·mean|w| when minimising, value − l1·mean|w| when maximising."""
    if not l1 or not weights:
        return value
    penalty = l1 * sum(abs(w) for w in weights) / len(weights)
    return value + penalty if goal == "min" else value - penalty


def searched(search: ir.Search, pinned: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """The params the optimiser varies: those of the block that `--set` does not pin."""
    return [bound for bound in search.bounds if bound[0] not in pinned]


# ---------------------------------------------------------------- the optimiser


def _nevergrad():
    try:
        import nevergrad as ng
    except ImportError as err:
        raise UsageError(f"`search` needs nevergrad: {EXTRA_HELP}") from err
    _tolerate_surrogate_failures(ng)
    return ng


def _tolerate_surrogate_failures(ng) -> None:
    """nevergrad ≤ 1.0.12's surrogate step (NGOpt's MetaModel, chosen for batches) calls
    `float()` on a one-element array, which numpy ≥ 2.4 refuses; it is treated as the failed
    surrogate fit nevergrad already recovers from (its CMA asks instead), not as a crash."""
    from nevergrad.optimization import metamodel, optimizerlib

    learn = optimizerlib.learn_on_k_best
    if getattr(learn, "_peftdsl", False):
        return

    def learn_on_k_best(*args, **kwargs):
        try:
            return learn(*args, **kwargs)
        except TypeError as err:
            raise metamodel.MetaModelFailure(str(err)) from err

    learn_on_k_best._peftdsl = True
    optimizerlib.learn_on_k_best = learn_on_k_best


def make_optimizer(search: ir.Search, bounds: Sequence[tuple[str, float, float]], start: Mapping[str, float]):
    import numpy as np

    ng = _nevergrad()
    lower = np.array([lo for _, lo, _ in bounds], dtype=float)
    upper = np.array([hi for _, _, hi in bounds], dtype=float)
    init = np.array([start[name] for name, _, _ in bounds], dtype=float)
    parametrization = ng.p.Array(init=init).set_bounds(lower, upper)
    parametrization.random_state = np.random.RandomState(search.seed)  # every draw the optimiser makes
    return ng.optimizers.registry[OPTIMIZERS[search.optimizer]](
        parametrization=parametrization, budget=search.budget, num_workers=search.batch)


# Evaluates a batch of candidates (full param assignments) and returns each one's eval value.
BatchEvaluator = Callable[[list[dict[str, float]]], list[float]]


def run_search(search: ir.Search, start: Mapping[str, float], pinned: Mapping[str, float],
               evaluate: BatchEvaluator, on_candidate: Callable[[Candidate], None] | None = None
               ) -> SearchOutcome:
    """Ask, evaluate and tell `search.budget` candidates, `search.batch` at a time."""
    bounds = searched(search, pinned)
    goal = search.objective.goal
    if not bounds:  # every param pinned: nothing to search
        return SearchOutcome(candidates=(), best={}, goal=goal, pinned=dict(pinned))
    names = [name for name, _, _ in bounds]
    candidates: list[Candidate] = []
    started = time.perf_counter()
    with warnings.catch_warnings():  # nevergrad and cma warn about their own internals
        warnings.simplefilter("ignore")
        optimizer = make_optimizer(search, bounds, start)
        while optimizer.num_ask < search.budget:
            asked = [optimizer.ask() for _ in range(min(search.batch, search.budget - optimizer.num_ask))]
            points = [dict(zip(names, (float(v) for v in x.value))) for x in asked]
            values = evaluate([{**pinned, **p} for p in points])
            for x, point, value in zip(asked, points, values):
                objective = penalised(value, list(point.values()), search.l1, goal)
                candidate = Candidate(step=len(candidates) + 1, params=point, value=value, objective=objective)
                candidates.append(candidate)
                optimizer.tell(x, _loss(objective, goal))
                if on_candidate is not None:
                    on_candidate(candidate)
    return SearchOutcome(candidates=tuple(candidates), best=dict(best_of(candidates, goal).params), goal=goal,
                         pinned=dict(pinned), seconds=time.perf_counter() - started)


def _loss(objective: float, goal: str) -> float:
    """What nevergrad minimises; a NaN or infinite objective is the worst finite loss."""
    loss = objective if goal == "min" else -objective
    return loss if math.isfinite(loss) else sys.float_info.max


def best_of(candidates: Sequence[Candidate], goal: str) -> Candidate:
    """The best objective; ties go to the earliest candidate, NaN never wins."""
    sign = 1.0 if goal == "max" else -1.0
    best = candidates[0]
    for candidate in candidates[1:]:
        if math.isnan(best.objective) or sign * candidate.objective > sign * best.objective:
            best = candidate
    return best


# ---------------------------------------------------------------- evaluating candidates


def objective_only(analysis, objective: ir.Select):
    """`analysis` with only the objective's eval, on its model only: what a candidate needs."""
    recipe = analysis.recipe
    target = next(e for e in recipe.evals if e.name == objective.eval)
    evals = (replace(target, models=(objective.model,), model_spans=()),)
    return replace(analysis, recipe=replace(recipe, evals=evals))


@dataclass
class LocalEvaluator:
    """Candidates in a loop in this process, on the session's executor and the loaded base."""

    analysis: Any  # the Analysis, restricted by `objective_only`
    job: PointJob  # device, quiet, allow_pickle
    compose: Callable[[str, Any], dict]  # (composition, analysis at the candidate) -> deltas
    compose_seconds: float = 0.0
    eval_seconds: float = 0.0

    def __call__(self, points: list[dict[str, float]]) -> list[float]:
        values = []
        for point in points:
            at = self.analysis.at(point)
            composed = 0.0

            def timed(name, at=at):
                nonlocal composed
                started = time.perf_counter()
                try:
                    return self.compose(name, at)
                finally:
                    composed += time.perf_counter() - started

            started = time.perf_counter()
            job = replace(self.job, params=tuple(sorted(at.params.items())), point=tuple(point.items()))
            rows = evaluate_point(at, job, timed)
            self.eval_seconds += time.perf_counter() - started - composed
            self.compose_seconds += composed
            values.append(float(rows[0].value))
        return values


@dataclass(frozen=True)
class CandidateJob(PointJob):
    """A grid-point job that evaluates only the search objective (eval, model)."""

    objective: tuple[str, str] = ("", "")


def _remote_candidate(job: CandidateJob) -> list:
    """A Ray task: rebuild the front end from the recipe file, evaluate one candidate's objective."""
    from peftdsl.compiler import Options, analyse
    from peftdsl.diagnostics import Sink
    from peftdsl.lower import lower
    from peftdsl.runtime.execute import Executor

    sink = Sink()
    analysis = analyse(job.recipe, sink, Options(use_files=True, allow_pickle=job.allow_pickle,
                                                 overrides=job.params))
    if analysis is None or sink.has_errors():
        raise RuntimeError(f"the recipe does not compile on the worker: {sink.errors[0].message}")
    eval_name, model = job.objective
    analysis = objective_only(analysis, ir.Select(eval=eval_name, model=model, goal="min", span=None))
    import torch

    if job.threads:  # as in a sweep: the driver's thread count gives the driver's bits
        torch.set_num_threads(job.threads)
    with Executor(analysis.adapters, device=torch.device(job.device), seed=analysis.recipe.seed,
                  base=analysis.base) as executor:
        return evaluate_point(analysis, job, lambda name: executor.run(lower(analysis, name)))


@dataclass
class RayEvaluator:
    """A batch of candidates as Ray tasks, one candidate per task (`sweep.run_on_ray`)."""

    job: PointJob
    objective: ir.Select
    address: str | None

    def __call__(self, points: list[dict[str, float]]) -> list[float]:
        from peftdsl.evaluation.sweep import run_on_ray

        base = dict(self.job.params)
        jobs = [CandidateJob(**{**vars(self.job), "params": tuple(sorted({**base, **p}.items())),
                                "point": tuple(p.items()),
                                "objective": (self.objective.eval, self.objective.model)}) for p in points]
        return [float(row.value) for row in run_on_ray(jobs, self.address, task=_remote_candidate)]


# ---------------------------------------------------------------- the terminal


def print_candidates(outcome: SearchOutcome, console) -> None:
    """Every candidate as a table row (best marked), then the best point."""
    from rich.table import Table

    from peftdsl.numbers import show_point

    if not outcome.candidates:
        return
    names = list(outcome.candidates[0].params)
    table = Table("step", *names, "value", "objective", "")
    best = outcome.best_candidate
    for c in outcome.candidates:
        table.add_row(str(c.step), *(f"{c.params[n]:.4g}" for n in names), f"{c.value:.6g}", f"{c.objective:.6g}",
                      "best" if c is best else "")
    console.print(table)
    console.print(f"best (step {best.step}): {show_point(best.params)}")
