"""The fuzzer (bench/fuzz.py) on a fixed seed: hostile recipes never crash the front end.

A few hundred mutated recipes and hypothesis-drawn ones go through `lint` and
`explain` in process; each must exit 0, 1 or 2, print no traceback and no
"internal error", answer within a generous time bound, and never let a YAML tag
run code. Then the regressions the fuzzer found, each as its own small test.
`python bench/fuzz.py` runs the same oracle on 10,000+ cases.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import fuzz  # noqa: E402

CASE_SECONDS = 5.0  # generous: the slowest of 10,000 cases takes about 1 s on 2 cores
SEED = 20240601


@pytest.fixture(scope="module")
def ws(corpus_root: Path, tmp_path_factory) -> fuzz.Workspace:
    return fuzz.build_workspace(tmp_path_factory.mktemp("fuzz"), fixtures=corpus_root / "fixtures")


def assert_clean(outcomes: list[fuzz.Outcome], ws: fuzz.Workspace) -> None:
    failures = [f"{o.case} [{o.command}]: {o.failure}" for o in outcomes if o.failure]
    assert not failures, "\n".join(failures[:10])
    assert {o.status for o in outcomes} <= fuzz.ALLOWED_STATUSES
    slow = [(o.case, round(o.seconds, 2)) for o in outcomes if o.seconds > CASE_SECONDS]
    assert not slow, slow
    assert not ws.sentinel.exists(), "a YAML tag ran code"


def test_seeds_cover_the_corpus_and_the_examples(ws):
    labels = {s.label for s in ws.seeds}
    assert "corpus/clean_full.yaml" in labels and "corpus/y007_alias_bomb.yaml" in labels
    assert any(label.startswith("recipes/examples/") for label in labels)


def test_mutated_recipes_never_crash_lint(ws):
    outcomes = [fuzz.run_case(case, case_limit=30) for case in fuzz.mutation_cases(ws, 300, SEED)]
    assert_clean(outcomes, ws)
    assert {o.status for o in outcomes} >= {0, 1}  # the mutants are not all rejected outright


@pytest.mark.parametrize("kind", ["expression", "document"])
def test_hypothesis_recipes_never_crash_lint(ws, kind):
    outcomes = [fuzz.run_case(case, case_limit=30) for case in fuzz.hypothesis_cases(ws, 60, SEED, kind)]
    assert len(outcomes) == 60
    assert_clean(outcomes, ws)


@pytest.mark.parametrize("operator", [op.__name__ for op in fuzz.Mutator(random.Random(0), Path("x")).operators
                                      if op.__name__ not in ("byte_flip", "token_swap")])
def test_every_hostile_mutation_alone(ws, operator):
    """Each mutation kind, at several of its sizes (100,000-deep parentheses, 10^5-char names…)."""
    rng = random.Random(SEED)
    mutator = fuzz.Mutator(rng, ws.sentinel)
    seed = next(s for s in ws.seeds if s.label == "corpus/clean_full.yaml")
    outcomes = []
    for i in range(6):
        data = getattr(mutator, operator)(seed.text.encode())
        case = fuzz.Case(f"{operator}{i}", data, seed.folder, fuzz.lint_argv(rng))
        outcomes.append(fuzz.run_case(case, case_limit=30))
    assert_clean(outcomes, ws)


def test_a_sample_through_run(ws):
    outcomes = fuzz.run_sample(ws, 4, SEED, case_limit=120)
    assert_clean(outcomes, ws)
    assert 0 in {o.status for o in outcomes}  # unchanged seeds run to the end


def test_the_oracle_sees_internal_errors(ws, monkeypatch):
    """A bug must count as a failure: the fuzzer is only as good as what it notices."""
    import peftdsl.compiler

    def boom(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(peftdsl.compiler, "analyse", boom)
    seed = ws.seeds[0]
    outcome = fuzz.run_case(fuzz.Case("planted", seed.text.encode(), seed.folder, ("lint",)))
    assert outcome.failure and "internal error" in outcome.failure and "planted" in outcome.failure


# ---------------------------------------------------------------- regressions the fuzzer found


def _lint(ws: fuzz.Workspace, text: str | bytes) -> tuple[int, str]:
    import contextlib
    import io

    from peftdsl.cli import main

    path = ws.root / "corpus" / "regression.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(["lint", str(path), "--format", "concise"])
    return status, out.getvalue()


RECIPE = "peftdsl: 1\n{base}adapters:\n  a: {path}\ncompose:\n  m: 2 * a\noutputs:\n  m: out/m\n"


@pytest.mark.parametrize("path, shown", [
    ('"x\\0y"', "x␀y"),  # YAML's \0 escape: a NUL character no path can hold (was: ValueError)
    ("n" * 5000, "nnnn"),  # longer than NAME_MAX (was: OSError ENAMETOOLONG from Path.exists)
    ("~nouser/adapter", "~nouser/adapter"),  # an unknown user's home (was: RuntimeError from expanduser)
])
def test_impossible_adapter_paths_are_missing_inputs(ws, path, shown):
    status, output = _lint(ws, RECIPE.format(base="", path=path))
    assert status == 1 and "internal error" not in output
    assert "error[I301]" in output and shown in output


@pytest.mark.parametrize("base", ['"x\\0y"', "n" * 5000])
def test_impossible_base_paths_are_missing_inputs(ws, base):
    status, output = _lint(ws, RECIPE.format(base=f"base: {base}\n", path="fixtures/lora_r4"))
    assert status == 1 and "internal error" not in output
    assert "error[I301]" in output and "base model folder" in output


@pytest.mark.parametrize("nested", ["[" * 3000 + "1" + "]" * 3000, "{a: " * 3000 + "1" + "}" * 3000])
def test_yaml_nested_past_the_parsers_stack_is_refused(ws, nested):
    """PyYAML composes recursively: thousands of levels overflowed the stack (was: RecursionError)."""
    status, output = _lint(ws, f"peftdsl: 1\nadapters:\n  a: fixtures/lora_r4\nextra: {nested}\n")
    assert status == 1 and "internal error" not in output
    assert "error[Y007]" in output and "nests deeper" in output


# ---------------------------------------------------------------- surfaces: heads, full fine-tunes, the API


@pytest.mark.parametrize("surface", ["heads", "full", "api"])
def test_surfaces_never_crash(ws, surface):
    """A few dozen cases of each surface (`python bench/fuzz.py --surfaces …` runs thousands)."""
    summary = fuzz.fuzz_surfaces(ws, [surface], cases=40, seed=SEED, case_limit=60)[surface]
    assert summary.cases == 40
    failures = [f"{o.case} [{o.command}]: {o.failure}" for o in summary.failures]
    assert not failures, "\n".join(failures[:10])
    assert summary.statuses[0] and summary.statuses[1]  # some calls succeed, some are refused
    assert not ws.sentinel.exists()


def test_the_api_oracle_sees_foreign_exceptions():
    """Only peftdsl's own errors may leave the API: a TypeError from inside is a failure."""
    from peftdsl.errors import UsageError

    def refused():
        raise UsageError("fine")

    def broken():
        raise TypeError("unhashable type: 'dict'")

    assert fuzz.run_api_case("ok", ("refused", refused)).failure is None
    assert "TypeError" in fuzz.run_api_case("bad", ("broken", broken)).failure


def test_a_dense_term_that_cancels_leaves_a_lora_form(ws):
    """Found by the `full` surface: `2 * lo - 0 * ft` kept the kind `dense` with no dense term
    left, which broke the canonical-form invariants (an internal error under the checker)."""
    status, output = _lint(ws, "peftdsl: 1\nbase: fixtures/base\nadapters:\n  ft: fixtures/full_ft\n"
                               "  lo: fixtures/lora_r4\ncompose:\n  task: 2 * lo - 0 * ft\n"
                               "  small: svd(task, rank=4)\noutputs:\n  small: out/small\n")
    assert status == 0 and "internal error" not in output, output
    assert "warning[T409]" in output and "`ft` cancels out here" in output


def test_an_output_of_a_function_of_nothing_is_empty(ws):
    """Found by the `heads` surface: `pem(0 * a)` has a term (the pem) but no adapter under it;
    `run` failed with an IndexError looking for a template adapter. Now T410 at lint."""
    status, output = _lint(ws, "peftdsl: 1\nadapters:\n  a: fixtures/head_a\ncompose:\n  c: pem(0 * a)\n"
                               "outputs:\n  c: out/c\n")
    assert status == 1 and "error[T410]" in output and "output `c` would be empty" in output, output


@pytest.mark.parametrize("command", ["lint", "explain", "lock", "run"])
def test_an_unreadable_recipe_is_a_usage_error(command):
    """Found by the `api` surface (`load("/proc/self/mem")`): reading fails with EIO."""
    import contextlib
    import io

    from peftdsl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main([command, "/proc/self/mem"])
    assert status == 2 and "cannot read /proc/self/mem" in out.getvalue(), out.getvalue()


def test_api_paths_no_file_can_have_are_usage_errors(tmp_path):
    """Found by the `api` surface: `loads(text, root="\\0")` raised ValueError."""
    import peftdsl
    from peftdsl.errors import UsageError

    with pytest.raises(UsageError, match="`root` cannot be used"):
        peftdsl.loads("peftdsl: 1\n", root="x\0y")
    with pytest.raises(UsageError, match="cannot read /proc/self/mem"):
        peftdsl.load("/proc/self/mem")


@pytest.mark.parametrize("command", ["lint", "explain", "lock"])
def test_a_recipe_file_past_64_mib_is_refused_unread(tmp_path, command):
    """Found by the fuzzer: long_name over deep_yaml made a 3.4 GB recipe, and reading it
    whole took 12 GB before the OOM killer came. A sparse 65 MiB file, and /dev/zero."""
    import contextlib
    import io

    from peftdsl.cli import main

    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:
        handle.truncate(65 << 20)
    for path in (big, Path("/dev/zero")) if command == "lint" else (big,):  # the others want a regular file
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = main([command, str(path)])
        assert status == 2 and "larger than 64 MiB" in out.getvalue(), out.getvalue()


def test_eval_data_paths_no_file_can_have_are_missing(ws):
    """Found by the 10,000-case run: eval data named by a 10^5-character path made
    `Path.is_file` raise ENAMETOOLONG inside lint's eval checks (an internal error)."""
    status, output = _lint(ws, "peftdsl: 1\nbase: fixtures/base\neval:\n  - name: p\n    models: [base]\n"
                               f"    metric: perplexity\n    data: {'n' * 100_000}/t.txt\n")
    assert status == 1 and "internal error" not in output, output[:500]
    assert "error[E501]" in output and "does not exist" in output


def test_a_rank_1_extraction_is_written(ws, tmp_path):
    """Found by the `full` surface: `svd(task, rank=1)` of a full fine-tune gave (n, 1) factors
    whose last stride is not 1; writing them failed in `view(torch.uint8)` (internal error).
    The written factors must be the composition's."""
    import peftdsl
    import torch
    from safetensors.torch import load_file

    text = ("peftdsl: 1\nbase: fixtures/base\nadapters:\n  ft: fixtures/full_ft\ncompose:\n"
            "  task: -0.5 * ft\n  small: svd(task, rank=1)\noutputs:\n  small: " + str(tmp_path / "small") + "\n")
    recipe = peftdsl.loads(text, root=ws.root / "corpus")
    recipe.run(no_eval=True)
    written = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    deltas = recipe.compose("small", device="cpu").deltas()
    module = "model.layers.0.self_attn.q_proj"
    a = written[f"base_model.model.{module}.lora_A.weight"]
    b = written[f"base_model.model.{module}.lora_B.weight"]
    assert a.shape[0] == 1
    torch.testing.assert_close(b.float() @ a.float(), deltas[module])


def test_save_to_a_path_no_file_can_have_is_a_usage_error(ws):
    """Found by the `api` surface: `save("x" * 5000)` raised OSError ENAMETOOLONG."""
    import peftdsl
    from peftdsl.errors import UsageError

    recipe = peftdsl.loads("peftdsl: 1\nadapters:\n  a: fixtures/lora_r4\ncompose:\n  x: 2 * a\n",
                           root=ws.root / "corpus")
    with pytest.raises(UsageError, match="`path` cannot be used"):
        recipe.compose("x", device="cpu").save("x" * 5000)
