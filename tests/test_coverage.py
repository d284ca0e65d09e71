"""The coverage matrix: tiny random models of 15 architectures × the adapter features people use.

Each cell of `tests/coverage_cases.py` builds two random adapters with PEFT, composes
`0.7 * a - 0.3 * b` with peftdsl into an adapter output and a merged model, and judges them
against PEFT itself:

(a) every tensor of the merged model is base + Σ cᵢ·(PEFT's `merge_and_unload` of adapter i − base)
    (for (IA)³: PEFT's merge of l = 1 + Σ cᵢ·(lᵢ − 1), DESIGN §2), to 1e-5 of the tensor's scale;
(b) the adapter output loads in `PeftModel.from_pretrained`, and its logits are the merged model's
    (a full fine-tune's dense delta has no adapter output);
(c) the merged model loads in the Auto class of its task, with no missing or unexpected keys.

Refused cells assert the diagnostic, known-wrong cells are strict xfails, and cells that do not
apply skip with their reason. `scripts/coverage_table.py` turns a run of this file into the
README's table; the last test checks that the README's table is the one the cases give.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

import peftdsl
from tests import coverage_cases as cases

ROOT = Path(__file__).resolve().parent.parent
AUTO = {cases.CAUSAL_LM: "AutoModelForCausalLM", cases.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
        cases.SEQ_CLS: "AutoModelForSequenceClassification"}
# PEFT's task_type for each task. Classifiers get none: PEFT's SEQ_CLS saves the head as a
# full module, which is the saved-heads column's business, not every column's.
PEFT_TASK = {cases.CAUSAL_LM: "CAUSAL_LM", cases.SEQ_2_SEQ_LM: "SEQ_2_SEQ_LM", cases.SEQ_CLS: None}
# (r, lora_alpha, seed) of the two adapters: different ranks and scalings in one composition.
ADAPTERS = {"a": (4, 8, 1), "b": (6, 3, 2)}
WEIGHT_ATOL = 1e-5  # relative to each tensor's largest entry
LOGIT_ATOL = 1e-4  # relative to the largest logit

pytestmark = [  # PEFT's remarks: tied weights, fan_in_fan_out set for Conv1D, patterns all-linear did not need
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def tiny_and_fast():
    """One torch thread, and no model cards for the adapters PEFT saves.

    On these tiny matrices torch's thread pool costs far more than the arithmetic (an 8×32
    `addmm` takes ~11 ms with 2 threads and ~3 µs with one on a 2-core machine), and PEFT
    renders a Jinja model card on every `save_pretrained` (~50 ms) that nothing here reads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PeftModel, "create_or_update_model_card", lambda self, output_dir: None)
        yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------- base models


@dataclass(frozen=True)
class Base:
    path: Path
    model: torch.nn.Module  # pristine: adapters wrap deep copies
    state: dict[str, torch.Tensor]
    stored: frozenset[str]  # the tensor names in its safetensors files
    ties: bool  # whether its input embedding and output layer share one tensor


class Bases:
    """Each architecture's tiny model, built and saved on first use and shared by the module's cells."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def get(self, arch: cases.Arch, tie: bool) -> Base:
        key = (arch.id, tie and not arch.ties)
        if key not in self.built:
            settings = dict(arch.settings, **({"tie_word_embeddings": True} if key[1] else {}))
            torch.manual_seed(0)  # transformers initialises from the global generator
            model = getattr(transformers, arch.model)(getattr(transformers, arch.config)(**settings)).eval()
            path = self.root / "-".join(filter(None, (arch.id, "tied" if key[1] else "")))
            model.save_pretrained(path)
            stored = set()
            for shard in path.glob("*.safetensors"):
                with safe_open(shard, "pt") as handle:
                    stored.update(handle.keys())
            output = model.get_output_embeddings()
            ties = output is not None and output.weight is model.get_input_embeddings().weight
            state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            self.built[key] = Base(path, model, state, frozenset(stored), ties)
        return self.built[key]


def _scratch_parent(tmp_path_factory) -> Path:
    """Where cells write: a RAM disk where there is one. peftdsl fsyncs every output file and
    folder (atomic outputs); on a disk that is ~7 ms each, a third of a cell's time."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="peftdsl-coverage-", dir=shm))
    return tmp_path_factory.mktemp("coverage")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    parent = _scratch_parent(tmp_path_factory)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def workdir(scratch: Path, request) -> Path:
    folder = scratch / request.node.callspec.id
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def bases(scratch: Path) -> Bases:
    return Bases(scratch / "bases")


# ----------------------------------------------------------------------- adapters


def build_adapter(base: Base, cell: cases.Cell, name: str, folder: Path) -> PeftModel:
    """Adapter `name` of the cell, "trained" (every trainable parameter moved) and saved; returned unmerged."""
    r, alpha, seed = ADAPTERS[name]
    spec = cell.adapter
    if spec.peft_type == "FULL":  # every tensor trained, saved as a model folder
        model = copy.deepcopy(base.model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(folder)
        return model
    settings = {"task_type": PEFT_TASK[cell.arch.task], **spec.config}
    if spec.peft_type == "IA3":
        config = IA3Config(**settings)
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, **settings)
    model = get_peft_model(copy.deepcopy(base.model), config)
    if spec.convert:  # the initial factors, saved before training, as PEFT's conversion needs them
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(folder.with_name(f"{name}-initial"))
        model.peft_config["default"].init_lora_weights = config.init_lora_weights
    perturb(model, seed)
    initial = {"path_initial_model_for_weight_conversion": str(folder.with_name(f"{name}-initial"))} \
        if spec.convert else {}
    model.save_pretrained(folder, **initial)
    return model


def perturb(model: PeftModel, seed: int) -> None:
    """What training does: every trainable parameter moves (in name order, from a seeded generator).

    LoRA factors are drawn afresh (PEFT starts B at zero, which would make every check
    vacuous), (IA)³ vectors around one, and anything else PEFT trains (saved heads, biases,
    token rows, DoRA magnitudes) is nudged from its value.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "ia3_l" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif re.search(r"\.lora_(A|B|embedding_A|embedding_B)\b", name):
                param.copy_(0.1 * noise)
            else:
                param.add_(0.05 * noise)


def lora_on_a_tied_weight(model: PeftModel) -> bool:
    """Whether some LoRA layer's weight is shared with another parameter (a tied embedding / output layer).

    PEFT's unmerged forward then applies that delta to one side only, its merge to both (I313).
    Saved modules and trained token rows are not affected: PEFT handles their ties itself.
    """
    uses = Counter(param.data_ptr() for _, param in model.named_parameters(remove_duplicate=False))
    layers = [module.get_base_layer() for module in model.modules() if isinstance(module, LoraLayer)]
    return any(uses[layer.weight.data_ptr()] > 1 for layer in layers if hasattr(layer, "weight"))


def reference(base: Base, models: list[torch.nn.Module], weights: tuple[float, ...], peft_type: str):
    """The merged model's state dict the composition must give, from PEFT's own merges; and a
    spare copy of the base model (one of the merged copies, reset), for loading the output into."""
    if peft_type == "IA3":  # l = 1 + Σ cᵢ(lᵢ − 1), merged by PEFT
        first, *others = models
        vectors = [dict(other.named_parameters()) for other in others]
        with torch.no_grad():
            for name, param in first.named_parameters():
                if "ia3_l" in name:
                    param.copy_(1 + weights[0] * (param - 1)
                                + sum(w * (v[name] - 1) for w, v in zip(weights[1:], vectors, strict=True)))
        want = {k: v.detach().clone() for k, v in first.merge_and_unload().state_dict().items()}
        spare = others[0].unload()
    else:  # LoRA: PEFT merges each adapter; a full fine-tune is its own merge
        unloaded = [model if peft_type == "FULL" else model.merge_and_unload() for model in models]
        merged = [model.state_dict() for model in unloaded]
        want = {name: tensor + sum(w * (m[name] - tensor) for w, m in zip(weights, merged, strict=True))
                if tensor.is_floating_point() else tensor
                for name, tensor in base.state.items()}
        spare = unloaded[-1]
    spare.load_state_dict(base.state)
    return want, spare.eval()


def on_disk(base: Base, want: dict, model: torch.nn.Module, folder: Path) -> dict:
    """`want` under the names and layout the checkpoint stores: transformers 5 saves some models
    in their historical layout (GPT-NeoX's `embed_out`, Mixtral's and Qwen2-MoE's experts one
    by one), so where names differ the reference is saved by transformers itself and read back."""
    if base.stored <= want.keys():
        return want
    model.load_state_dict(want)
    model.save_pretrained(folder)
    model.load_state_dict(base.state)
    stored = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(shard))
    return stored


# ----------------------------------------------------------------------- peftdsl


def recipe_for(cell: cases.Cell, base: Base, folder: Path) -> peftdsl.Recipe:
    """Two outputs of one composition: an adapter (none for a dense delta) and a merged model."""
    adapter = "" if cell.adapter.peft_type == "FULL" else "\n  mix: out/mix"
    return peftdsl.loads(f"""peftdsl: 1
base: {base.path}
adapters: {{a: a, b: b}}
compose:
  mix: {cell.feature.expression}
  merged: mix
outputs:{adapter}
  merged: {{path: out/merged, merge: true}}
""", root=folder)


def assert_refused(recipe: peftdsl.Recipe, refused: cases.Refused) -> None:
    """Every error is the refusal (one per adapter, for a refused input), and there is one."""
    assert recipe.errors, "not refused"
    for error in recipe.errors:
        assert error.code == refused.code, (error.code, error.message)
        assert re.fullmatch(refused.message, error.message), error.message


def logits(model: torch.nn.Module, task: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, cases.VOCAB, (2, 7), generator=generator)}
    if task == cases.SEQ_2_SEQ_LM:
        inputs["decoder_input_ids"] = torch.randint(3, cases.VOCAB, (2, 5), generator=generator)
    with torch.no_grad():
        return model(**inputs).logits


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    scale = float(want.abs().max()) if want.is_floating_point() and want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=atol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------- the matrix


def _param(cell: cases.Cell):
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=cell.outcome.reason)] \
        if isinstance(cell.outcome, cases.KnownWrong) else []
    return pytest.param(cell, id=cell.id, marks=marks)


def test_checkpoint_renames_are_transformers_own():
    """Each rename peftdsl knows is one of transformers' conversion mapping, read the other way."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    for key, renames in peftdsl.inputs.CHECKPOINT_RENAMES.items():
        theirs = {(source, target) for transform in get_checkpoint_conversion_mapping(key) or ()
                  if type(transform).__name__ == "WeightRenaming"
                  for source, target in zip(transform.source_patterns, transform.target_patterns, strict=True)}
        for in_memory, on_disk in renames:
            assert any(re.sub(source, target, re.sub(in_memory, on_disk, probe, count=1)) == probe
                       for source, target in theirs
                       for probe in ("lm_head.weight", "model.layers.0.mlp.gate.weight")
                       if re.search(in_memory, probe)), (key, in_memory, on_disk)


@pytest.mark.parametrize("arch", cases.ARCHS, ids=lambda arch: arch.id)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_every_parameter_is_found_where_transformers_stores_it(arch: cases.Arch, tie: bool, bases: Bases):
    """`BaseInfo.stored_as` finds each parameter of the model in memory in the checkpoint that
    `save_pretrained` wrote: under its own name, under the key transformers' conversion renames
    it to (inputs.CHECKPOINT_RENAMES: GPT-NeoX's `lm_head` is `embed_out` on disk), or as the
    input embedding a tied output layer shares. Fused experts, stored per expert, are
    peftdsl.experts' business."""
    base = bases.get(arch, tie)
    info = peftdsl.inputs.read_base(base.path)
    fused = tuple(arch.experts)
    for name, param in base.model.named_parameters(remove_duplicate=False):
        if name.removesuffix(".weight").endswith(fused) or name.endswith(fused):
            continue
        stored = info.stored_as(name, tuple(param.shape))
        assert stored is not None, f"{name} is not found in {sorted(base.stored)}"
        assert tuple(info.weights[stored].shape) == tuple(param.shape), name


@pytest.mark.parametrize("cell", [_param(cell) for cell in cases.cells()])
def test_cell(cell: cases.Cell, bases: Bases, workdir: Path):
    if isinstance(cell.outcome, cases.NotApplicable):
        pytest.skip(cell.outcome.reason)
    arch, feature = cell.arch, cell.feature
    base = bases.get(arch, cell.adapter.tie)
    models = [build_adapter(base, cell, name, workdir / name) for name in ADAPTERS]
    recipe = recipe_for(cell, base, workdir)
    if isinstance(cell.outcome, cases.Refused):
        assert_refused(recipe, cell.outcome)
        return
    assert recipe.errors == []
    tied = base.ties and lora_on_a_tied_weight(models[0])
    # documented: the delta lands on the shared tensor, as merge_and_unload does; and only then
    # (a classifier's config may say tie_word_embeddings, but it has no output layer to tie)
    assert ("I313" in {d.code for d in recipe.diagnostics}) == tied
    want, spare = reference(base, models, feature.weights, cell.adapter.peft_type)
    recipe.run(no_eval=True)

    # (a) every stored tensor of the merged model, against PEFT's merges: all the base stores,
    # and more only where the reference has it apart (a saved lm_head of a tied base, written untied)
    stored = {}
    for shard in sorted((workdir / "out" / "merged").glob("*.safetensors")):
        stored.update(load_file(shard))
    want_stored = on_disk(base, want, spare, workdir / "reference")
    assert base.stored <= stored.keys() <= want_stored.keys()
    for name, tensor in stored.items():
        assert_close(tensor, want_stored[name], WEIGHT_ATOL, name)
    assert any(not torch.equal(want[name], base.state[name]) for name in want), "the adapters change nothing"

    # (c) the merged model loads in its Auto class, every tensor in place (tied ones too)
    auto = getattr(transformers, AUTO[arch.task])
    merged, info = auto.from_pretrained(workdir / "out" / "merged", output_loading_info=True)
    merged.eval()
    assert type(merged).__name__ == arch.model
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    for name, tensor in merged.state_dict().items():
        assert_close(tensor, want[name], WEIGHT_ATOL, f"loaded {name}")

    # (b) the adapter output in PEFT gives the merged model's logits
    expected = logits(merged, arch.task)
    assert not torch.allclose(expected, logits(base.model, arch.task)), "the composition changes no logit"
    if cell.adapter.peft_type == "FULL":  # a dense delta: no adapter output
        return
    loaded = PeftModel.from_pretrained(spare, workdir / "out" / "mix").eval()
    if tied:  # PEFT's unmerged forward applies a tied delta to the input side only (I313)
        loaded = loaded.merge_and_unload()
    assert_close(logits(loaded, arch.task), expected, LOGIT_ATOL, "logits")


# ----------------------------------------------------------------------- the README's table


def _table_script():
    spec = importlib.util.spec_from_file_location("coverage_table", ROOT / "scripts" / "coverage_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_the_one_the_cases_give():
    """The README's table cannot drift from the cases: regenerate it with `python scripts/coverage_table.py`."""
    script = _table_script()
    assert script.readme_table((ROOT / "README.md").read_text()) == script.render(script.declared_results())


def test_the_table_shows_what_the_run_did(tmp_path: Path):
    """A cell is ✓ only if its test passed in the run the table is made from; anything else shows."""
    script = _table_script()
    supported = next(c for c in cases.cells() if isinstance(c.outcome, cases.Supported))
    refused = next(c for c in cases.cells() if isinstance(c.outcome, cases.Refused))
    # no cell is known wrong today: a supported one stands in for one
    wrong = next(c for c in cases.cells() if isinstance(c.outcome, cases.KnownWrong) or c.id != supported.id
                 and isinstance(c.outcome, cases.Supported))
    wrong = dataclasses.replace(wrong, outcome=cases.KnownWrong("wrong in some way"))
    skipped = next(c for c in cases.cells() if isinstance(c.outcome, cases.NotApplicable))
    report = tmp_path / "report.xml"
    report.write_text(f"""<testsuites><testsuite>
<testcase name="test_cell[{supported.id}]"><failure message="boom"/></testcase>
<testcase name="test_cell[{refused.id}]"/>
<testcase name="test_cell[{wrong.id}]"><skipped type="pytest.xfail" message="x"/></testcase>
<testcase name="test_cell[{skipped.id}]"><skipped type="pytest.skip" message="n/a"/></testcase>
</testsuite></testsuites>""")
    results = script.junit_results(report)
    assert results == {supported.id: "failed", refused.id: "passed", wrong.id: "xfailed", skipped.id: "skipped"}
    by_id = {c.id: c for c in cases.cells()} | {wrong.id: wrong}
    texts = {cell_id: script._cell_text(by_id[cell_id], results, {wrong.outcome.reason: 1}) for cell_id in results}
    assert texts == {supported.id: "**failed**", refused.id: f"`{refused.outcome.code}`", wrong.id: "known wrong [1]",
                     skipped.id: "n/a"}
    assert "**not run**" in script.render(results)  # every other cell
