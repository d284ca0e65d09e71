"""The operator registry drives every stage: each row is wired end to end, and nothing else is.

A row of `peftdsl.operators.OPERATORS` is the only place an operator is declared; this
walks every row through the whole pipeline (name resolution, kind and keyword checks,
canonicalisation, lowering's rank rule, the kernel) and checks that an operator the
registry does not know can never execute silently.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peftdsl
from peftdsl import build, ir
from peftdsl.compiler import Options, analyse_recipe
from peftdsl.diagnostics import Sink
from peftdsl.errors import InternalError
from peftdsl.lower import group_rank, lower
from peftdsl.operators import OPERATORS
from peftdsl.runtime import ops
from peftdsl.runtime.execute import Executor
from tests.factories import make_lora, save_tiny_llama

VALID = {"int": 2, "float": 0.5}


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("operators")
    save_tiny_llama(root / "base")
    make_lora(root / "a", seed=1, r=4, alpha=8)
    make_lora(root / "b", seed=2, r=4, alpha=16)
    return root


def call(name: str, argument: str = "0.6 * a - 0.4 * b") -> str:
    """A call of operator `name` with every required keyword at a valid value."""
    keywords = [f"{k.name}={VALID[k.type]}" for k in OPERATORS[name].keywords if k.required]
    return f"{name}({', '.join([argument, *keywords])})"


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_row_is_wired_end_to_end(lab: Path, name: str):
    operator = OPERATORS[name]
    assert operator.name == name
    assert callable(getattr(ops, operator.kernel, None)), f"no kernel `{operator.kernel}` in peftdsl.runtime.ops"
    assert name in build.RESERVED  # `svd: a + b` cannot shadow the operator

    recipe = peftdsl.loads(f"peftdsl: 1\nbase: base\nadapters: {{a: a, b: b}}\ncompose:\n  x: {call(name)}\n",
                           root=lab)
    assert recipe.errors == [], [d.message for d in recipe.errors]
    composition = recipe.compose("x")
    assert composition.kind == operator.returns.value
    deltas = composition.deltas()
    assert deltas and all(torch.isfinite(d).all() for d in deltas.values())

    # the rank rule is exactly the rank of the factors the kernel returns (the streaming
    # writer sizes each file's header from it before computing anything)
    analysis = recipe._analysis
    task = lower(analysis, "x")
    with Executor(analysis.adapters, device=torch.device("cpu"), seed=0) as executor:
        factors = executor.run(task)
    for group in task.groups:
        rank = group_rank(task.form, group)
        for module in group.modules:
            if operator.returns is ir.Kind.DENSE:
                assert rank is None
            else:
                assert factors[module].A.shape[0] == rank == factors[module].B.shape[1]
                assert torch.linalg.matrix_rank(deltas[module]) <= rank

    # and the result is written and loads: an adapter PEFT reads back, or a merged model
    out = lab / "out" / name
    merged = operator.returns is ir.Kind.DENSE
    text = (f"peftdsl: 1\nbase: base\nadapters: {{a: a, b: b}}\ncompose:\n  x: {call(name)}\n"
            f"outputs:\n  x: {{path: {out}, merge: {str(merged).lower()}}}\n")
    peftdsl.loads(text, root=lab).run(force=True)
    if merged:
        model = AutoModelForCausalLM.from_pretrained(out)
        base = AutoModelForCausalLM.from_pretrained(lab / "base")
        for module, delta in deltas.items():
            torch.testing.assert_close(model.get_submodule(module).weight - base.get_submodule(module).weight,
                                       delta, atol=1e-5, rtol=1e-4)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab / "base"), out)
        for module, delta in deltas.items():
            layer = model.get_submodule(f"base_model.model.{module}")
            torch.testing.assert_close(layer.get_delta_weight("default"), delta, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_row_checks_its_keywords_and_kinds(lab: Path, name: str):
    operator = OPERATORS[name]
    unknown = peftdsl.loads(f"peftdsl: 1\nadapters: {{a: a}}\ncompose:\n  x: {name}(a, nosuch=1)\n", root=lab)
    assert "T406" in {d.code for d in unknown.errors}
    for keyword in operator.keywords:
        if keyword.type == "choice":
            bad = f'{keyword.name}="{keyword.choices[0]}x"'
        elif keyword.low is not None:
            bad = f"{keyword.name}={keyword.low - 1}"
        else:
            continue
        text = call(name, "a").replace(")", f", {bad})") if not keyword.required else \
            call(name, "a").replace(f"{keyword.name}={VALID[keyword.type]}", bad)
        recipe = peftdsl.loads(f"peftdsl: 1\nadapters: {{a: a}}\ncompose:\n  x: {text}\n", root=lab)
        assert "T406" in {d.code for d in recipe.errors}, (name, text)
    if ir.Kind.IA3 not in operator.accepts:
        nested = peftdsl.loads(f"peftdsl: 1\nadapters: {{a: a}}\ncompose:\n  x: {call(name, '2')}\n", root=lab)
        assert nested.errors


def test_every_kernel_belongs_to_a_row():
    kernels = {name for name, fn in inspect.getmembers(ops, inspect.isfunction)
               if fn.__module__ == ops.__name__ and not name.startswith("_")}
    assert kernels == {op.kernel for op in OPERATORS.values()}


def _analysis(lab: Path, expression: str):
    sink = Sink()
    recipe = build.build_recipe(build.SourceFile(lab / "r.yaml", f"peftdsl: 1\nadapters: {{a: a, b: b}}\n"
                                                                  f"compose:\n  x: {expression}\n"), sink)
    return analyse_recipe(recipe, sink, Options())


def test_an_operator_without_a_row_is_an_internal_error(lab: Path):
    analysis = _analysis(lab, "svd(a + b, rank=2)")
    form = analysis.canonical["x"]
    leaf = form.terms[0].leaf
    forged = dataclasses.replace(form, terms=(dataclasses.replace(form.terms[0],
                                                                  leaf=dataclasses.replace(leaf, func="nope")),))
    analysis = dataclasses.replace(analysis, canonical={**analysis.canonical, "x": forged})
    with Executor(analysis.adapters, device=torch.device("cpu"), seed=0) as executor, \
            pytest.raises(InternalError, match="`nope`"):
        executor.run(lower(analysis, "x"))


def test_a_row_whose_kernel_is_missing_is_an_internal_error(lab: Path, monkeypatch):
    monkeypatch.setitem(OPERATORS, "svd", dataclasses.replace(OPERATORS["svd"], kernel="no_such_kernel"))
    analysis = _analysis(lab, "svd(a + b, rank=2)")
    with Executor(analysis.adapters, device=torch.device("cpu"), seed=0) as executor, \
            pytest.raises(InternalError, match="no_such_kernel"):
        executor.run(lower(analysis, "x"))
