"""Plan the tensors an adapter carries beside its factors (DESIGN §2 "Beyond factors").

Saved modules (classification heads, `lm_head`), trained biases, trained token rows and
`lora_bias` deltas are composed as task vectors against the base: for a canonical form
Σ cᵢ·xᵢ each such tensor becomes W = W_base + Σ cᵢ·(Wᵢ − W_base), a term that does not
carry it contributing 0. This pass decides, per tensor and before any weight is read,
which of three equivalent-where-defined computations a composition needs:

- `affine`: every term carries the tensor (the same rows, for tokens), as a value, and
  the coefficients sum to 1; then W = Σ cᵢ·Wᵢ and the base is not read. This is the
  only case defined for a tensor the base lacks (a head created at fine-tuning time):
  the paper's head averaging.
- `task`: W = W_base + Σ cᵢ·τᵢ; needs the base's tensor.
- `delta`: every carrier holds a delta (`lora_bias`): Σ cᵢ·dᵢ, added to the base's bias.

Operators pass parts through as their registry row says (`Operator.parts`): `svd`, `pem`
and `peft_linear` act on factors and carry parts through linearly; `ties`, `dare_*` and
`magnitude_prune` treat each part's task vectors like any other task tensors, so they are
not linear and need the base. No torch here: `lint` runs this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from peftdsl import ir
from peftdsl.inputs import INPUT_EMBEDDINGS, AdapterInfo, BaseInfo, PartInfo
from peftdsl.ir import adapter_leaves
from peftdsl.numbers import show_number
from peftdsl.operators import OPERATORS, Parts

AFFINE, TASK, DELTA = "affine", "task", "delta"


@dataclass(frozen=True, slots=True)
class PartPlan:
    """How one composition sets one tensor beside the factors."""

    tensor: str
    mode: str  # affine | task | delta
    role: str  # the carriers' role (module, bias, tokens, lora_bias); `bias` when they differ
    shape: tuple[int, ...]  # the composed value: the tensor's shape, or rows × hidden for tokens
    rows: tuple[int, ...] = ()  # tokens: the union of the terms' rows, sorted
    saved_module: str = ""  # module: the saved module it belongs to (for `modules_to_save`)


@dataclass(frozen=True, slots=True)
class PartProblem:
    """Why a composition cannot set a tensor: a type error at the expression (T414)."""

    tensor: str
    message: str
    help: str


def linear_coefficients(comb: ir.Combination) -> dict[str, float] | None:
    """The coefficient of each source adapter in the parts of `comb`, through operators that
    carry parts linearly; None when an operator on the way does not (ties, dare…)."""
    coefs: dict[str, float] = {}
    for term in comb.terms:
        leaf = term.leaf
        if isinstance(leaf, ir.AdapterLeaf):
            coefs[leaf.name] = coefs.get(leaf.name, 0.0) + term.coef
            continue
        operator = OPERATORS.get(leaf.func)  # no row: the executor says so (InternalError)
        if operator is None or operator.parts is not Parts.LINEAR:
            return None
        inner = linear_coefficients(leaf.arg)
        if inner is None:
            return None
        for name, coef in inner.items():
            coefs[name] = coefs.get(name, 0.0) + term.coef * coef
    return coefs


def drops_full_parts(leaf: ir.OpLeaf) -> bool:
    """Whether an operator leaf leaves out its argument's full-fine-tune tensors that are no
    module's weight (norms, biases, embeddings): `svd` extracting a LoRA, unless `rest="save"`."""
    operator = OPERATORS.get(leaf.func)
    return operator is not None and operator.keyword("rest") is not None and dict(leaf.options).get("rest") != "save"


def extracts_embeddings(leaf: ir.OpLeaf) -> bool:
    """Whether an operator leaf turns its argument's full-fine-tune input embeddings into
    embedding LoRA factors (`svd(x, rank=k, embed=true)`)."""
    return dict(leaf.options).get("embed") is True


def is_input_embedding(tensor: str) -> bool:
    return tensor.endswith(INPUT_EMBEDDINGS)


@dataclass(frozen=True, slots=True)
class Omitting:
    """What the operators above a point of a form leave out of a full fine-tune's tensors
    beside its modules: all of them (`svd` without `rest="save"`), or its input embeddings,
    which `svd(…, embed=true)` extracts as factors instead."""

    dropping: bool = False
    extracting: bool = False

    def below(self, leaf: ir.OpLeaf) -> Omitting:
        return Omitting(self.dropping or drops_full_parts(leaf), self.extracting or extracts_embeddings(leaf))

    def omits(self, tensor: str, part: PartInfo) -> bool:
        return part.role == "full" and (self.dropping or (self.extracting and is_input_embedding(tensor)))


NOTHING_OMITTED = Omitting()


def omitted_tensors(adapters: Mapping[str, AdapterInfo], leaf: ir.OpLeaf, *, extracted: bool = False) -> tuple[str, ...]:
    """The full fine-tunes' tensors beside their modules that reach `leaf`'s argument and that
    `leaf` itself leaves out: dropped ones, or with `extracted` the embeddings it extracts; sorted."""
    here = Omitting(drops_full_parts(leaf), extracts_embeddings(leaf))
    names = set()
    for name in adapter_leaves(leaf.arg):
        for tensor, part in (adapters[name].parts.items() if name in adapters else ()):
            if not here.omits(tensor, part):
                continue
            if extracted == (here.extracting and is_input_embedding(tensor)):
                names.add(tensor)
    return tuple(sorted(names))


def _visible(comb: ir.Combination, adapters: Mapping[str, AdapterInfo],
             omitting: Omitting = NOTHING_OMITTED) -> set[tuple[str, str]]:
    """(adapter, tensor) pairs whose part reaches the result by at least one path."""
    seen: set[tuple[str, str]] = set()
    for term in comb.terms:
        leaf = term.leaf
        if isinstance(leaf, ir.AdapterLeaf):
            info = adapters.get(leaf.name)
            if info is not None:
                seen.update((leaf.name, t) for t, p in info.parts.items() if not omitting.omits(t, p))
        else:
            seen |= _visible(leaf.arg, adapters, omitting.below(leaf))
    return seen


def _drops_anything(comb: ir.Combination, adapters: Mapping[str, AdapterInfo]) -> bool:
    """Whether some operator in `comb` leaves out a full fine-tune's tensors that reach it."""
    for term in comb.terms:
        leaf = term.leaf
        if not isinstance(leaf, ir.OpLeaf):
            continue
        here = NOTHING_OMITTED.below(leaf)
        if any(here.omits(t, p) for name in adapter_leaves(leaf.arg)
               if name in adapters for t, p in adapters[name].parts.items()):
            return True
        if _drops_anything(leaf.arg, adapters):
            return True
    return False


def plan_parts(form: ir.Combination, adapters: Mapping[str, AdapterInfo],
               base: BaseInfo | None) -> tuple[list[PartPlan], list[PartProblem]]:
    """Every tensor beside the factors that `form` sets, with how; and what it cannot set."""
    leaves = [name for name in adapter_leaves(form) if name in adapters]
    carried: dict[str, list[PartInfo]] = {}
    visible = _visible(form, adapters)
    for leaf in leaves:
        for tensor, part in adapters[leaf].parts.items():
            if (leaf, tensor) in visible:
                carried.setdefault(tensor, []).append(part)
    if not carried:
        return [], []
    # Where `svd` drops a full fine-tune's other tensors, a term may reach a tensor by one path
    # and not by another: only a task vector against the base is then right.
    coefs = linear_coefficients(form) if not _drops_anything(form, adapters) else None
    plans, problems = [], []
    for tensor in sorted(carried):
        parts = carried[tensor]
        outcome = _plan(tensor, parts, len(parts) == len(leaves), coefs, base)
        (plans if isinstance(outcome, PartPlan) else problems).append(outcome)
    return plans, problems


def _plan(tensor: str, parts: list[PartInfo], every_term: bool, coefs: dict[str, float] | None,
          base: BaseInfo | None) -> PartPlan | PartProblem:
    roles = {part.role for part in parts}
    first = parts[0]
    rows = tuple(sorted({row for part in parts for row in part.rows}))
    shape = (len(rows), first.shape[1]) if first.role == "tokens" else first.shape
    role = first.role if len(roles) == 1 else "bias"
    plan = PartPlan(tensor, TASK, role, shape, rows, first.saved_module)
    if roles == {"lora_bias"}:
        return PartPlan(tensor, DELTA, role, shape, rows, first.saved_module)
    total = sum(coefs.values()) if coefs is not None else None
    same_rows = len({part.rows for part in parts}) == 1
    if (total is not None and abs(total - 1.0) <= 1e-9 and every_term and same_rows
            and "lora_bias" not in roles):
        return PartPlan(tensor, AFFINE, role, shape, rows, first.saved_module)
    if base is not None and (not base.weights or base.stored_as(tensor, first.shape)):  # no weights: pickled
        return plan
    return _problem(tensor, base, total, every_term, same_rows)


def _problem(tensor: str, base: BaseInfo | None, total: float | None, every_term: bool,
             same_rows: bool) -> PartProblem:
    if base is None:
        where = "the recipe names no `base`"
        fix = "name the base model (`base:`) to compose it as a task vector"
    else:
        where = f"the base has no `{tensor}` (a module created at fine-tuning time)"
        fix = "average it: give every term the module and make the weights sum to 1, e.g. `0.5*a + 0.5*b`"
    if total is None:
        why = "and `ties`/`dare`/`magnitude_prune` need its task vectors, which are relative to the base"
    elif not every_term:
        why = "and not every term carries it, so only a task vector against the base is defined"
    elif not same_rows:
        why = "and the terms train different rows of it, so only a task vector against the base is defined"
    else:
        why = f"and the weights sum to {show_number(total)}, not 1"
    return PartProblem(tensor, f"cannot compose `{tensor}`: {where}, {why}",
                       fix if base is not None or total is not None else
                       "name the base model (`base:`), or average the terms outside `ties`/`dare`")
