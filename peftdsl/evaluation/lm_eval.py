"""`metric: lm_eval`: tasks of EleutherAI's lm-evaluation-harness on the model patched in memory.

The harness is an optional extra (``pip install 'peftdsl[lm-eval]'``). It is imported only
when an ``lm_eval`` entry runs; ``lint`` uses the torch-free half of this module
(:func:`installed`, :func:`task_metrics`), which reads task YAMLs as plain YAML.

How a run goes (docs/recipes.md, "lm_eval"):

- The model is wrapped as it is, ``HFLM(pretrained=<the patched model>, tokenizer=…)``:
  nothing is written to disk and nothing is reloaded, so every model of a recipe (base,
  adapters, compositions, sweep points) runs on the one loaded base.
- The harness never reaches the network: the Hub and ``datasets`` are put in offline mode
  for the duration, so a task reads local files (``dataset_path: json`` with
  ``dataset_kwargs: {data_files: …}``) or datasets already in the Hugging Face cache.
- Relative paths inside task YAMLs are read from the ``include_path`` folder (the harness
  reads them from the working directory; peftdsl runs it from there), so a recipe means
  the same wherever it is run from.
- Task loading and seeding follow ``lm_eval.simple_evaluate``'s defaults (seeds 0 / 1234,
  ``num_fewshot`` overriding a task's own unless that is 0, no chat template), so the value
  is the one ``simple_evaluate`` gives on the merged model. ``simple_evaluate`` itself is
  not called: it collects the environment (``pip list``, ``git``) on every call, seconds
  per model. The global random states are restored afterwards.
- The value is the ``measure`` metric of each task (default: the task's first metric), and
  with several tasks the mean of their values, each task weighing the same.

Choices where the harness and DESIGN are silent: only the ``include_path`` folder is indexed
unless a task is not found there (indexing the harness's own thousands of tasks takes tens of
seconds); no bootstrap standard errors are computed; tasks marked unsafe (code execution) are
refused, as the harness refuses them by default.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from peftdsl import tasks as model_tasks
from peftdsl.errors import EvalDataError

if TYPE_CHECKING:
    import torch

    from peftdsl.evaluation.evaluate import EvalOutcome, EvalSpec

INSTALL_HINT = "pip install 'peftdsl[lm-eval]'"
OPTIONS = ("tasks", "include_path", "num_fewshot", "measure")  # what only `lm_eval` entries read
RANDOM_SEED, OTHER_SEED = 0, 1234  # simple_evaluate's defaults (lm_eval.defaults)
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_SCAN_LIMIT = 2000  # task YAMLs lint reads from one include_path; beyond, measures go unchecked
_YAML_LIMIT = 1 << 20


# ================================================================ the lint side: torch-free


def installed() -> bool:
    """Whether lm-evaluation-harness can be imported (found without importing it)."""
    return importlib.util.find_spec("lm_eval") is not None


class _TaskYaml(yaml.SafeLoader):
    """Task YAMLs tag callables (`!function utils.process_docs`): read them as nothing."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_metrics(include_path: Path) -> dict[str, tuple[str, ...] | None] | None:
    """Each task a folder of task YAMLs defines, with the names of its ``metric_list``
    (following ``include:``); None for a task whose metrics the YAML does not list (the
    harness then picks them by ``output_type``), and None for the whole folder when it holds
    more YAMLs than lint reads."""
    paths = sorted(path for pattern in ("*.yaml", "*.yml") for path in include_path.rglob(pattern))
    if len(paths) > _SCAN_LIMIT:
        return None
    found: dict[str, tuple[str, ...] | None] = {}
    for path in paths:
        config = _task_config(path)
        name = config.get("task")
        if isinstance(name, str):
            found[name] = _metric_names(config.get("metric_list"))
    return found


def _task_config(path: Path, depth: int = 0) -> dict:
    """One task YAML with the YAMLs it ``include:``s under it (its own keys win); {} when unreadable."""
    try:
        if path.stat().st_size > _YAML_LIMIT:
            return {}
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYaml)  # noqa: S506 - a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return {}
    if not isinstance(config, dict):
        return {}
    include = config.get("include")
    if isinstance(include, str) and depth < 8:
        return {**_task_config(path.parent / include, depth + 1), **config}
    return config


def _metric_names(metric_list: object) -> tuple[str, ...] | None:
    if not isinstance(metric_list, list) or not metric_list:
        return None
    names = tuple(m.get("metric") for m in metric_list if isinstance(m, dict))
    return names if names and all(isinstance(n, str) for n in names) else None


def measure_name(measure: str) -> str:
    """``exact_match`` of ``exact_match,strict-match``: the metric, without its filter."""
    return measure.partition(",")[0]


# ================================================================ running: imports the harness


def evaluate(model: torch.nn.Module, tokenizer: Any, spec: EvalSpec, *, quiet: bool = True) -> EvalOutcome:
    """The ``measure`` of ``spec.tasks`` on ``model`` as it is now (patched or not)."""
    from peftdsl.evaluation.evaluate import EvalOutcome

    harness = _harness(spec.name)
    names = list(spec.tasks or ())
    if not names:
        raise EvalDataError(f"eval `{spec.name}`: `lm_eval` needs `tasks`")
    include = str(Path(spec.include_path).resolve()) if spec.include_path else None
    with _offline(), _logs(quiet), _in_folder(include), _restored_random_state():
        _seed_as_simple_evaluate()
        manager = _task_manager(include, tuple(names))
        try:
            loaded = manager.load(names)
        except Exception as err:  # noqa: BLE001 - a task's YAML or data: the user's to fix
            raise EvalDataError(f"eval `{spec.name}`: lm_eval cannot load {_listed(names)}: {_reason(err)}") from err
        _configure(loaded["tasks"], spec.num_fewshot)
        lm = _wrap(harness, model, tokenizer, spec, quiet)
        try:
            results = harness.evaluator.evaluate(
                lm=lm, task_dict=loaded, limit=spec.limit, bootstrap_iters=0, log_samples=False,
                fewshot_as_multiturn=True)  # simple_evaluate's value (it matters with a chat template only)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - templates and fields of the user's task, mostly
            if "out of memory" in str(err).lower():
                raise
            raise EvalDataError(f"eval `{spec.name}`: lm_eval failed on {_listed(names)}: {_reason(err)}") from err
    measured = {name: _measured(results, name, spec.measure, spec.name) for name in names}
    value = sum(v for _, v in measured.values()) / len(measured)
    samples = results.get("n-samples") or {}
    details = {"tasks": {name: {"metric": key, "value": v, "samples": (samples.get(name) or {}).get("effective")}
                         for name, (key, v) in measured.items()}}
    return EvalOutcome(value, details)


def _harness(eval_name: str):
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as err:
        raise EvalDataError(f"eval `{eval_name}`: metric `lm_eval` needs lm-evaluation-harness "
                            f"({err}); install it with {INSTALL_HINT}") from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def _indexed(include: str | None, defaults: bool, fingerprint: tuple):
    """A TaskManager over ``include`` (and the harness's own tasks when ``defaults``); cached
    while the folder's YAMLs stay as they are (``fingerprint``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def _task_manager(include: str | None, names: tuple[str, ...]):
    """The include_path's own index when it defines every task, else one with the harness's tasks."""
    fingerprint = _fingerprint(include)
    if include is not None:
        manager = _indexed(include, False, fingerprint)
        if all(name in manager.all_tasks for name in names):
            return manager
    return _indexed(include, True, fingerprint)


def _fingerprint(include: str | None) -> tuple:
    """Name, size and modification time of every YAML under ``include``."""
    if include is None:
        return ()
    stats = []
    for path in sorted(Path(include).rglob("*.y*ml")):
        with contextlib.suppress(OSError):
            stat = path.stat()
            stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(stats)


def _configure(loaded: Mapping[str, Any], num_fewshot: int | None) -> None:
    """What simple_evaluate does to each task before evaluating it."""
    for task in loaded.values():
        if num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:  # a task that says 0 means it
                task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=OTHER_SEED)


def _wrap(harness, model: torch.nn.Module, tokenizer: Any, spec: EvalSpec, quiet: bool):
    """``HFLM`` around the model as it is. HFLM re-ties a model's embeddings when it wraps it;
    a patched model may hold a saved ``lm_head`` of its own, so the model's ties are left as
    they are. The tokenizer is a copy: HFLM may give it a pad token."""
    import copy

    from peftdsl.evaluation.evaluate import _context_length

    backend = "seq2seq" if spec.task == model_tasks.SEQ_2_SEQ_LM else "causal"
    max_length = _context_length(model, spec.max_length) if spec.max_length is not None else None
    model.tie_weights = lambda *args, **kwargs: None  # an instance attribute, shadowing the method
    try:
        lm = harness.models.huggingface.HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend=backend,
                                             batch_size=spec.batch_size, max_length=max_length)
    finally:
        del model.tie_weights
    if quiet:  # every request method draws a bar unless told not to (rolling windows insist: forced)
        for method in ("loglikelihood", "loglikelihood_rolling", "generate_until", "_loglikelihood_tokens"):
            if hasattr(lm, method):
                setattr(lm, method, _without_bars(getattr(lm, method)))
    return lm


def _without_bars(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        return method(*args, **{**kwargs, "disable_tqdm": True})

    return call


def _measured(results: Mapping[str, Any], task: str, measure: str | None, eval_name: str) -> tuple[str, float]:
    """(the result key, its value) of ``measure`` in ``task``'s results; its first metric by default."""
    row = (results.get("results") or {}).get(task)
    if not isinstance(row, dict):
        raise EvalDataError(f"eval `{eval_name}`: lm_eval gave no results for `{task}`")
    keys = [key for key in row if "," in key and not measure_name(key).endswith("_stderr")]
    wanted = measure or _first_metric(results, task) or (measure_name(keys[0]) if keys else "")
    key = wanted if "," in wanted else next((k for k in keys if measure_name(k) == wanted), None)
    value = row.get(key) if key is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        offered = ", ".join(f"`{k}`" for k in keys) or "none"
        raise EvalDataError(f"eval `{eval_name}`: task `{task}` has no metric `{wanted}` (its metrics: {offered})")
    return key, float(value)


def _first_metric(results: Mapping[str, Any], task: str) -> str | None:
    """The first metric of the task's ``metric_list``, or of the metrics its type gave it."""
    names = _metric_names(((results.get("configs") or {}).get(task) or {}).get("metric_list"))
    if names:
        return names[0]
    better = (results.get("higher_is_better") or {}).get(task) or {}
    return next(iter(better), None)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ---------------------------------------------------------------- the harness's surroundings


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hub and `datasets` offline, whatever the environment said when they were imported
    (both read it once, at import); everything as it was afterwards."""
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    flags = []
    try:
        import huggingface_hub.constants as hub

        flags.append((hub, "HF_HUB_OFFLINE"))
        import datasets.config as data

        flags += [(data, "HF_HUB_OFFLINE"), (data, "HF_DATASETS_OFFLINE")]
    except ImportError:
        pass
    saved_flags = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    for module, name, _ in saved_flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved_flags:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _logs(quiet: bool) -> Iterator[None]:
    """The harness logs every step, and warns of defaults it fills in and of being handed a
    model object: only its errors are shown (peftdsl reports its own), and its progress bars
    unless quiet."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = None
    if quiet:
        with contextlib.suppress(ImportError):
            import datasets.utils as data_utils
            import lm_eval.api.task as task_module
            from tqdm import tqdm

            bars = (data_utils.are_progress_bars_disabled(), task_module, task_module.tqdm)
            data_utils.disable_progress_bars()
            task_module.tqdm = functools.partial(tqdm, disable=True)  # building requests draws a bar
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars is not None:
            disabled, task_module, original = bars
            task_module.tqdm = original
            if not disabled:
                data_utils.enable_progress_bars()


@contextlib.contextmanager
def _in_folder(folder: str | None) -> Iterator[None]:
    """Run from the include_path folder, so that task YAMLs' relative data files are read from there."""
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _restored_random_state() -> Iterator[None]:
    """Python's, numpy's and torch's global generators come back as they were."""
    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _seed_as_simple_evaluate() -> None:
    import numpy as np
    import torch

    random.seed(RANDOM_SEED)
    np.random.seed(OTHER_SEED)
    torch.manual_seed(OTHER_SEED)
