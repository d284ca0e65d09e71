"""Evaluating grid points: in process, or as Ray tasks (`--executor ray`).

One function, `evaluate_point`, computes a point's compositions and evaluates them;
the local executor calls it in a loop with the base model loaded once, and the Ray
executor calls it inside tasks (one GPU per task where the cluster has GPUs), so
both give the same results.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from peftdsl.diagnostics import Sink
from peftdsl.errors import UsageError


@dataclass(frozen=True)
class PointJob:
    """Everything a worker needs to evaluate one grid point from the recipe file alone."""

    recipe: Path
    params: tuple[tuple[str, float], ...]  # all params at this point (sets and sweep values)
    point: tuple[tuple[str, float], ...]  # the swept values, for the report
    device: str
    quiet: bool = True
    allow_pickle: bool = False
    threads: int = 0  # torch CPU threads: the same count as the driver gives the same bytes


@functools.lru_cache(maxsize=2)
def _base_model(path: str, device: str, dtype: str | None, task: str):
    from peftdsl.evaluation.evaluate import load_base

    return load_base(path, device=device, dtype=dtype, task=task)



def eval_dtype(evals) -> str | None:
    return next((dict(t.options).get("dtype") for t in evals if dict(t.options).get("dtype")), None)


def evaluate_point(analysis, job: PointJob, compute_deltas, cache: dict | None = None) -> list:
    """Every eval entry on the compositions of `analysis` (the recipe at `job.params`); report rows.

    `cache` maps (eval, canonical form) to a value: a model whose canonical form does
    not change across grid points (`base`, a plain adapter, a composition that uses
    no swept param) is evaluated once per sweep, not once per point.
    """
    from peftdsl.evaluation.apply import TiedWeightWarning
    from peftdsl.evaluation.evaluate import EvalSpec, evaluate_models
    from peftdsl.evaluation.report import Result
    from peftdsl.outputs.merge import base_weight_files

    recipe = analysis.recipe
    cache = {} if cache is None else cache
    task = analysis.task
    specs = [EvalSpec(name=t.name, metric=t.metric, data=t.data, models=t.models, seed=recipe.seed, task=task,
                      **{k: v for k, v in t.options if k != "dtype"}) for t in recipe.evals]
    form = {m: analysis.canonical.get(m, m) for spec in specs for m in spec.models}
    todo = [spec.model_copy(update={"models": missing}) for spec in specs
            if (missing := tuple(m for m in spec.models if (spec.name, form[m]) not in cache))]
    if todo:
        models = sorted({m for spec in todo for m in spec.models if m != "base"})
        deltas = {m: compute_deltas(m) for m in models}
        base = recipe.base_path or (analysis.base.path if analysis.base else Path(recipe.base))
        base_weight_files(base, allow_pickle=job.allow_pickle)  # a pickled base needs --allow-pickle here too
        model, tokenizer = _base_model(str(base), job.device, eval_dtype(recipe.evals), task)
        with warnings.catch_warnings():  # the front end said so already, as I313, at the adapter
            warnings.simplefilter("ignore", TiedWeightWarning)
            rows = evaluate_models(model, tokenizer, todo, deltas, device=job.device, quiet=job.quiet)
        for row in rows:
            cache[row.eval, form[row.model]] = row.value
    return [Result(eval=spec.name, model=m, metric=spec.metric, value=cache[spec.name, form[m]],
                   params=dict(job.point)) for spec in specs for m in spec.models]


def _remote_point(job: PointJob) -> list:
    """A Ray task: rebuild the front end from the recipe file, evaluate one point.

    Rows come back as `Result` objects (Ray pickles them), not JSON: JSON has no
    infinity, and an infinite perplexity is a legitimate value to select on.
    """
    from peftdsl.compiler import Options, analyse
    from peftdsl.lower import lower
    from peftdsl.runtime.execute import Executor

    sink = Sink()
    analysis = analyse(job.recipe, sink, Options(use_files=True, allow_pickle=job.allow_pickle,
                                                 overrides=job.params))
    if analysis is None or sink.has_errors():
        raise RuntimeError(f"the recipe does not compile on the worker: {sink.errors[0].message}")
    import torch

    if job.threads:  # Ray starts workers with one thread; reductions in another order differ in the last bit
        torch.set_num_threads(job.threads)
    with Executor(analysis.adapters, device=torch.device(job.device), seed=analysis.recipe.seed,
                  base=analysis.base) as executor:
        return evaluate_point(analysis, job, lambda name: executor.run(lower(analysis, name)))


def run_on_ray(jobs: list[PointJob], address: str | None, task=None) -> list:
    """Every job as a Ray task, results in grid order (identical to the local executor's);
    `task` evaluates one job (default `_remote_point`; a search passes its own)."""
    try:
        import ray
    except ImportError as err:
        raise UsageError("--executor ray needs Ray: pip install 'peftdsl[ray]'") from err

    if not ray.is_initialized():
        if address is not None:
            probe_address(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except (OSError, RuntimeError, ValueError) as err:  # Ray's ConnectionError is an OSError
            where = f"the Ray cluster at `{address}`" if address else "a local Ray cluster"
            raise UsageError(f"--executor ray: cannot connect to {where}: {_first_line(err)}") from None
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    import torch

    threads = torch.get_num_threads()
    jobs = [dataclasses.replace(job, device="cuda" if gpus else "cpu", threads=threads) for job in jobs]
    remote = ray.remote(num_gpus=gpus, max_retries=0)(task or _remote_point)
    return [row for batch in ray.get([remote.remote(job) for job in jobs]) for row in batch]


PROBE_SECONDS = 5.0  # a cluster's head answers a TCP connect at once; anything slower is not one


def probe_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """A usage error, within `timeout` seconds, when nothing listens at a Ray `--address`.

    `ray.init` retries an address that does not answer for a minute or more and then
    raises a ConnectionError; a TCP connect says the same in a fraction of a second.
    `auto` and `local` are Ray's to resolve.
    """
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, auto, local)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:  # refused, timed out, unknown host
        reason = err.strerror or str(err) or type(err).__name__
        raise UsageError(f"--address {address}: no Ray cluster answers there ({reason}); start one with "
                         "`ray start --head`, or check the address") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

