"""Model cards: the ``README.md`` in the Hugging Face Hub's format that goes with every output.

A card is YAML front matter (what the Hub indexes: ``base_model``, ``library_name``,
``tags``, ``license``, ``pipeline_tag``) emitted with PyYAML, then a Markdown body made
from the output's provenance (the recipe's text, the canonical expression, every input
with its sha256) and, when the run evaluated the output, the report's values for it.
It is written inside the output's atomic folder, beside ``peftdsl.json``, and holds no
time, no output path and nothing else that differs between two runs of one recipe: the
same recipe and inputs give the same bytes (docs/recipes.md, "Model cards").

Choices the Hub's format leaves to us:

- ``base_model`` must be a Hub model id. The recipe's ``base: hf:org/name@rev`` gives
  ``org/name`` (the field has no revision; the body names it). A ``base:`` that is a
  local folder is never a Hub id; the input adapters' ``base_model_name_or_path`` is used
  instead when it is one (``org/name``, or a legacy single name such as ``gpt2``, by the
  Hub's repo-id rules, and no folder of that name beside the recipe). Otherwise the front
  matter has no ``base_model`` and the body says which local base the output was made on.
- ``license`` is copied from the base's own ``README.md`` front matter (with
  ``license_name``/``license_link`` for ``other``); it is left out when the base gives none.
- ``pipeline_tag`` comes from the task type the adapters declare (or the base's
  ``architectures`` say); it is left out when nothing says it.
- Evaluation results go in the body only: the Hub's ``model-index`` needs a Hub dataset
  id for each result, which a recipe's local data files do not have.

Torch-free: it reads only the front end's analysis and the provenance.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from peftdsl import ir, tasks
from peftdsl.numbers import show_number

if TYPE_CHECKING:
    from peftdsl.compiler import Analysis
    from peftdsl.evaluation.report import Result

CARD = "README.md"

# PEFT task types (and peftdsl.tasks' names for them) -> the Hub's pipeline tags.
PIPELINE_TAGS = {
    tasks.CAUSAL_LM: "text-generation",
    tasks.SEQ_2_SEQ_LM: "text2text-generation",
    tasks.SEQ_CLS: "text-classification",
    tasks.TOKEN_CLS: "token-classification",
    tasks.QUESTION_ANS: "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}

_KIND_NAMES = {"lora": "LoRA adapter", "ia3": "(IA)³ adapter"}
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
_FRONT_MATTER_LIMIT = 1 << 20  # a base's README is read up to here for its license


# ---------------------------------------------------------------- front matter


def hub_model_id(name: str | None, recipe_folder: Path) -> str | None:
    """``name`` as a Hub model id, or None when it is not one (a path, an empty name).

    ``hf:org/name@rev`` gives ``org/name``. Anything else must follow the Hub's repo-id
    rules (huggingface_hub's ``validate_repo_id``: ``name`` or ``namespace/name``, at most
    96 characters of letters, digits, ``-_.``, no ``--`` or ``..``, not ending in ``.git``)
    and must not be a folder beside the recipe, which would make it a relative path.

    >>> hub_model_id("hf:org/tiny@v1", Path("/nonexistent"))
    'org/tiny'
    >>> hub_model_id("../models/tiny", Path("/nonexistent")) is None
    True
    """
    if not name:
        return None
    if name.startswith("hf:"):
        name = name[3:].partition("@")[0]
    elif _is_local(recipe_folder, name):
        return None
    if len(name) > 96 or "--" in name or ".." in name or name.endswith(".git") or not _REPO_ID.fullmatch(name):
        return None
    return name


def _is_local(folder: Path, name: str) -> bool:
    try:
        return (folder / name).exists()
    except (OSError, ValueError):  # a name the file system cannot hold is no folder of ours
        return False


def base_license(base_dir: Path | None) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link`` for ``other``) from the front matter
    of the base's ``README.md``; empty when it has none or it cannot be read."""
    matter = front_matter_of(base_dir / CARD) if base_dir is not None else {}
    license_ = matter.get("license")
    if not isinstance(license_, str) or not license_.strip():
        return {}
    fields = {"license": license_}
    if license_ == "other":
        fields.update({key: matter[key] for key in ("license_name", "license_link") if isinstance(matter.get(key), str)})
    return fields


def front_matter_of(path: Path) -> dict[str, Any]:
    """The YAML front matter of a Markdown file as a dict; empty when there is none or it is broken."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(_FRONT_MATTER_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return {}
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, flags=re.S)
    if match is None:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def operator_tags(form: ir.Combination) -> list[str]:
    """Tags for how the output was made: each function it calls (``svd``, ``dare-ties``) and
    ``task-arithmetic`` when some combination weighs or adds adapters (not a plain copy)."""
    tags: set[str] = set()
    for combination in _combinations(form):
        if len(combination.terms) > 1 or any(term.coef != 1 for term in combination.terms):
            tags.add("task-arithmetic")
        tags.update(term.leaf.func.replace("_", "-") for term in combination.terms if isinstance(term.leaf, ir.OpLeaf))
    return sorted(tags)


def _combinations(form: ir.Combination) -> Iterator[ir.Combination]:
    stack = [form]
    while stack:
        combination = stack.pop()
        yield combination
        stack.extend(term.leaf.arg for term in combination.terms if isinstance(term.leaf, ir.OpLeaf))


def card_metadata(analysis: Analysis, out: ir.Output) -> dict[str, Any]:
    """The front matter of output ``out``'s card, its keys in a fixed order."""
    recipe = analysis.recipe
    form = analysis.canonical[out.name]
    leaves = [analysis.adapters[name] for name in ir.adapter_leaves(form) if name in analysis.adapters]
    folder = recipe.path.parent
    candidates = [recipe.base] if recipe.base and recipe.base.startswith("hf:") else []
    candidates += [info.base_model for info in leaves]
    base_model = next((hub for name in candidates if (hub := hub_model_id(name, folder))), None)
    metadata: dict[str, Any] = {}
    if base_model is not None:
        metadata["base_model"] = base_model
    metadata["library_name"] = "transformers" if out.merge else "peft"
    metadata.update(base_license(analysis.base.path if analysis.base is not None else None))
    task = tasks.declared_task((info.task_type for info in leaves), analysis.base.config if analysis.base else None)
    if task in PIPELINE_TAGS:
        metadata["pipeline_tag"] = PIPELINE_TAGS[task]
    kind = "merge" if out.merge else form.kind.value
    metadata["tags"] = ["peftdsl", *sorted({kind, *operator_tags(form)})]
    return metadata


# ---------------------------------------------------------------- the card


def output_card(analysis: Analysis, out: ir.Output, provenance: Mapping[str, Any],
                results: Sequence[Result] = ()) -> bytes:
    """The bytes of output ``out``'s ``README.md``: front matter, then the body.

    ``results`` are the run's evaluation rows; those of ``out`` (and of ``base`` in the
    same evals, for comparison) at the params the output was computed at go in the card.
    """
    metadata = card_metadata(analysis, out)
    rows = card_results(results, out.name, provenance.get("params") or {})
    leaves = [analysis.adapters[n] for n in ir.adapter_leaves(analysis.canonical[out.name]) if n in analysis.adapters]
    base = analysis.recipe.base or next((info.base_model for info in leaves if info.base_model), None)
    return card_text(metadata, provenance, rows, base=base).encode("utf-8")


def card_results(results: Sequence[Result], model: str, params: Mapping[str, float]) -> list[Result]:
    """The rows of ``model`` and, in the same evals, of ``base``, at ``params`` (a sweep's point)."""
    def here(row: Result) -> bool:
        return all(params.get(name) == value for name, value in row.params.items())

    evals = {row.eval for row in results if row.model == model and here(row)}
    return [row for row in results if here(row) and row.eval in evals and row.model in (model, "base")]


def card_text(metadata: Mapping[str, Any], provenance: Mapping[str, Any], results: Sequence[Result],
              *, base: str | None) -> str:
    """The whole card as text; a pure function of its arguments."""
    header = yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True, default_flow_style=False)
    recipe = provenance["recipe"]
    name, kind = provenance["output"], provenance["kind"]
    what = "merged model (the base with the composed delta folded in)" if provenance.get("merge") \
        else _KIND_NAMES.get(kind, f"{kind} adapter")
    lines = [
        f"---\n{header}---", "",
        f"# {name}", "",
        f"A {what}, made by peftdsl {provenance['peftdsl']} from the recipe `{recipe['name']}`, "
        "with arithmetic on PEFT adapters and no training.", "",
        "## Composition", "",
        *_fenced(provenance["canonical"], ""), "",
        f"Kind `{kind}`, written as {provenance['dtype']} on {provenance['device']}; seed {provenance['seed']}; "
        f"torch {provenance['torch']}, peft {provenance['peft']}.", "",
    ]
    params = provenance.get("params") or {}
    if params:
        lines += ["Params: " + ", ".join(f"`{k}` = {show_number(v)}" for k, v in sorted(params.items())) + ".", ""]
    lines += ["## Base model", "", _base_line(metadata, base), ""]
    lines += ["## Inputs", "", "| adapter | source | sha256 |", "|---|---|---|"]
    for adapter, info in sorted((provenance.get("inputs") or {}).items()):
        lines.append(f"| {_cell(adapter)} | {_code(info.get('path') or '')} | {_code(info.get('sha256') or 'unknown')} |")
    lines += ["", "## Evaluation", "", *_results_lines(results, name), ""]
    lines += ["## Recipe", "", f"`{recipe['file']}`, sha256 `{recipe['sha256']}`:", "",
              *_fenced(recipe["text"].rstrip("\n"), "yaml"), ""]
    sets = "".join(f" --set {k}={show_number(v)}" for k, v in sorted(params.items()))
    lines += ["Reproduce with", "", *_fenced(f"peftdsl run {recipe['file']}{sets} --only {name}", "sh")]
    return "\n".join(lines) + "\n"


def _base_line(metadata: Mapping[str, Any], base: str | None) -> str:
    """The base as the user named it, and what the front matter's ``base_model`` says."""
    hub = metadata.get("base_model")
    link = f"[`{hub}`](https://huggingface.co/{hub})" if hub else None
    if base is None:
        return "The recipe names no base model, and its adapters record none."
    if base.startswith("hf:"):
        revision = base.partition("@")[2]
        return f"{link}" + (f", revision `{revision}`." if revision else ".")
    if base == hub:
        return f"{link}."
    local = f"{_code(base)} (a local folder, not a Hub id)"
    return local + (f"; its adapters record the Hub model {link}, the card's `base_model`." if link
                    else "; the card names no `base_model`.")


def _results_lines(results: Sequence[Result], name: str) -> list[str]:
    if not results:
        return [f"No evaluation results: this run did not evaluate `{name}` at these params (no `eval` entry names it, "
                "evaluation was skipped, or the output was saved from the Python API)."]
    from peftdsl.evaluation.report import _format_value

    lines = ["| eval | metric | model | value |", "|---|---|---|---|"]
    lines += [f"| {_cell(r.eval)} | {_cell(r.metric)} | {_cell(r.model)} | {_format_value(r.value)} |"
              for r in results]
    point = results[0].params
    if point:
        lines += ["", "At the sweep's point " + ", ".join(f"`{k}` = {show_number(v)}" for k, v in point.items()) + "."]
    return lines


def _fenced(text: str, language: str) -> list[str]:
    """A fenced code block whose fence is longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", text, fence]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(text: str) -> str:
    """An inline code span for a table cell (a span may not hold its own fence)."""
    text = _cell(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
