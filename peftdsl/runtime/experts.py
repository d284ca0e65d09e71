"""The tensors of MoE expert modules (`target_parameters`; names and metadata in `peftdsl.experts`).

- reading: each expert's A_e, B_e sliced out of PEFT's fused factors (A rows e·r…, B
  columns e, e + E, …), every fused tensor read once per chunk;
- adapter outputs: per-expert results fused back into PEFT's layout, a parameter at a
  time, as soon as all its experts are computed (:class:`AdapterFusion`);
- the base: the fused parameter as the model holds it — its shape and orientation
  (`is_transposed`, which PEFT reads too) from the architecture transformers builds on
  the meta device, and its keys on disk from transformers' own checkpoint conversion
  (`revert_weight_conversion`, what `save_pretrained` uses), so that a merged model is
  written in the layout its base checkpoint has (fused, or one tensor per expert as
  Mixtral's `block_sparse_moe.experts.3.w1.weight`);
- evaluation: the patched value of a fused parameter in a loaded model.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from peftdsl.errors import InputDataError
from peftdsl.experts import expert_name, factor_keys, nesting_order, parse_expert_name
from peftdsl.runtime.fold import Delta, DenseDelta, LoraDelta, fold_weight

# ---------------------------------------------------------------- reading


def read_factors(read: Callable[[str], torch.Tensor], infos) -> tuple[torch.Tensor, torch.Tensor]:
    """A [g, r, in] and B [g, out, r] of a chunk's modules; expert modules are sliced out of
    their fused factors. ``read(key)`` gives one checked float32 tensor."""
    cache: dict[str, torch.Tensor] = {}

    def tensor(key: str) -> torch.Tensor:
        if key not in cache:
            cache[key] = read(key)
        return cache[key]

    As, Bs = [], []
    for info in infos:
        A, B = tensor(info.keys[0]), tensor(info.keys[1])
        slot = info.expert
        if slot is not None:
            A = A[slot.index * info.rank:(slot.index + 1) * info.rank]  # A.reshape(E, r, in)[e]
            B = B[:, slot.index::slot.count]  # B.reshape(out, r, E)[:, :, e]
        As.append(A)
        Bs.append(B)
    return torch.stack(As), torch.stack(Bs)


def split_names(names: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Ordinary module names, and expert module names grouped by parameter (by expert index)."""
    plain, fused = [], {}
    for name in names:
        parsed = parse_expert_name(name)
        if parsed is None:
            plain.append(name)
        else:
            fused.setdefault(parsed[0], []).append((parsed[1], name))
    return plain, {p: [n for _, n in sorted(experts)] for p, experts in sorted(fused.items())}


# ---------------------------------------------------------------- adapter outputs


class AdapterFusion:
    """Per-expert factors back into PEFT's fused `lora_A` (r·E × in) / `lora_B` (out × r·E).

    ``plan`` every expert module first (the shapes go into the file's header before any
    compute); ``add`` each computed expert: the fused pair of a parameter comes back once
    all its experts have. Experts whose ranks differ are padded with zero factors to the
    largest, which leaves every ΔW_e unchanged.
    """

    def __init__(self) -> None:
        self._shapes: dict[str, dict[int, tuple[int, int, int]]] = {}  # param -> expert -> (rank, out, in)
        self._pending: dict[str, dict[int, LoraDelta]] = {}

    @staticmethod
    def claims(module: str) -> bool:
        return parse_expert_name(module) is not None

    def plan(self, module: str, rank: int, out_features: int, in_features: int) -> None:
        parameter, index = parse_expert_name(module)
        self._shapes.setdefault(parameter, {})[index] = (rank, out_features, in_features)

    def ranks(self) -> dict[str, int]:
        """Each parameter's rank per expert (what `rank_pattern` says of it)."""
        return {p: max(r for r, _, _ in experts.values()) for p, experts in self._shapes.items()}

    def keys(self, parameter: str) -> tuple[str, str]:
        module, _, name = parameter.rpartition(".")
        siblings = nesting_order(p.rpartition(".")[2] for p in self._shapes if p.rpartition(".")[0] == module)
        return factor_keys(module, len(siblings) - 1 - siblings.index(name))

    def specs(self, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        specs = {}
        ranks = self.ranks()
        for parameter, experts in self._shapes.items():
            if sorted(experts) != list(range(len(experts))):
                raise ValueError(f"parameter `{parameter}`: experts {sorted(experts)} are not 0…{len(experts) - 1}")
            _, out_features, in_features = experts[0]
            width = ranks[parameter] * len(experts)
            key_a, key_b = self.keys(parameter)
            specs[key_a] = (dtype, (width, in_features))
            specs[key_b] = (dtype, (out_features, width))
        return specs

    def add(self, module: str, delta: LoraDelta) -> dict[str, torch.Tensor]:
        parameter, index = parse_expert_name(module)
        pending = self._pending.setdefault(parameter, {})
        pending[index] = delta
        if len(pending) < len(self._shapes[parameter]):
            return {}
        del self._pending[parameter]
        rank = self.ranks()[parameter]
        A = torch.stack([_padded(pending[e].A, rank, 0) for e in range(len(pending))])  # [E, r, in]
        B = torch.stack([_padded(pending[e].B, rank, 1) for e in range(len(pending))], dim=-1)  # [out, r, E]
        key_a, key_b = self.keys(parameter)
        return {key_a: A.reshape(-1, A.shape[-1]), key_b: B.reshape(B.shape[0], -1)}


def _padded(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor
    shape = list(factor.shape)
    shape[dim] = missing
    return torch.cat([factor, factor.new_zeros(shape)], dim=dim)


# ---------------------------------------------------------------- the base's parameters


@functools.lru_cache(maxsize=4)
def meta_model(base_dir: Path):
    """The base's architecture on the meta device (no memory, no weights); None when
    transformers cannot build it."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_dir)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            try:
                return AutoModelForCausalLM.from_config(config)
            except ValueError:  # not a causal LM
                return AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 — an architecture transformers cannot build
        return None


def transposed(model, parameter: str) -> bool:
    """Whether the model stores `parameter` as (E, in, out): its experts module's
    `is_transposed`, exactly what PEFT's ParamWrapper reads."""
    tensor = model.get_parameter(parameter)
    module = model.get_submodule(parameter.rpartition(".")[0])
    return tensor.dim() == 3 and bool(getattr(module, "is_transposed", False))


def check_base(analysis, sink):
    """Check every expert parameter against the base model transformers builds (I307), and
    take each expert's layout from it; the analysis, updated where a layout changed.

    The front end checked what the base's headers and config.json tell; this covers a
    checkpoint that stores experts one tensor each, which only the model's own
    conversion relates to the fused parameter. Runs before anything is computed or written.
    """
    if analysis.base is None:
        return analysis
    parameters = {m.expert.parameter for info in analysis.adapters.values() for m in info.modules.values()
                  if m.expert is not None}
    model = meta_model(analysis.base.path) if parameters else None
    if model is None:
        return analysis
    adapters = {}
    for name, info in analysis.adapters.items():
        modules, problem = {}, None
        for module_name, module in info.modules.items():
            if module.expert is not None:
                layout, found = _in_model(model, module, name)
                problem = problem or found
                module = module if layout in (None, module.layout) else dataclasses.replace(module, layout=layout)
            modules[module_name] = module
        if problem is not None:
            sink.emit("I307", problem, analysis.recipe.adapter(name).span,
                      help="the adapter was trained on another base model")
        changed = any(modules[n] is not m for n, m in info.modules.items())
        adapters[name] = dataclasses.replace(info, modules=modules) if changed else info
    return dataclasses.replace(analysis, adapters=adapters)


def _in_model(model, module, adapter: str) -> tuple[str | None, str | None]:
    """The expert's layout in the model, and what does not fit (or None)."""
    slot = module.expert
    try:
        tensor = model.get_parameter(slot.parameter)
    except AttributeError:
        return None, f"adapter `{adapter}` adapts parameter `{slot.parameter}`, which the base model does not have"
    shape, out_in = tuple(tensor.shape), (module.out_features, module.in_features)
    if tensor.dim() == 2:
        fits = slot.count == 1 and shape == out_in
        layout = "linear"
    else:
        count = shape[0] if tensor.dim() == 3 else None
        if count is not None and count != slot.count:
            return None, (f"parameter `{slot.parameter}` has {slot.count} experts in `{adapter}` but {count} in "
                          "the base model")
        layout = "conv1d" if transposed(model, slot.parameter) else "linear"
        fits = tensor.dim() == 3 and shape[1:] == (out_in if layout == "linear" else out_in[::-1])
    if not fits:
        return None, (f"parameter `{slot.parameter}`: each expert is {out_in[0]}×{out_in[1]} in `{adapter}` "
                      f"but the base's parameter is {'×'.join(map(str, shape))}")
    return layout, None


def expert_stack(parameter: str, names: list[str], deltas: Mapping[str, Delta], shape: tuple[int, ...],
                 is_transposed: bool) -> torch.Tensor:
    """The fused parameter's ΔW (float32, the parameter's shape) from its experts' deltas."""
    frames = []
    for name in names:
        delta = deltas[name]
        frame = delta.B.float() @ delta.A.float() if isinstance(delta, LoraDelta) else delta.delta.float()
        frames.append(frame.T if is_transposed else frame)
    stacked = torch.stack(frames) if len(shape) == 3 else frames[0]
    if tuple(stacked.shape) != tuple(shape):
        raise InputDataError(f"the experts of `{parameter}` give a delta of shape {tuple(stacked.shape)}, "
                             f"but the parameter is {tuple(shape)}")
    return stacked


# ---------------------------------------------------------------- merged checkpoints


def merge_functions(deltas: Mapping[str, Delta], fused: Mapping[str, list[str]], base_dir: Path,
                    stored: Mapping[str, tuple[int, ...]]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """For every stored tensor that holds part of an adapted expert parameter, ``W ↦ W + ΔW``.

    ``stored`` maps the base checkpoint's tensor names to shapes. A parameter stored as
    it is in memory is changed in place; otherwise transformers' reverse conversion of
    ΔW (the one `save_pretrained` applies to the weights: renames, per-expert splits,
    concatenations — all of them rearrangements, so linear) gives each stored tensor's
    share. A parameter's ΔW is built when the writer first reaches one of its tensors
    and let go once the last is written.
    """
    model = meta_model(Path(base_dir))
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for parameter, names in fused.items():
        if model is None:
            raise InputDataError(f"transformers cannot build the base model, so peftdsl cannot place the delta "
                                 f"of `{parameter}` in its checkpoint")
        tensor = model.get_parameter(parameter)
        share = _ParameterShare(parameter, names, deltas, model, tuple(tensor.shape), parameter in stored)
        for key, shape in share.layout(tensor).items():
            if stored.get(key) != shape:
                raise InputDataError(f"the base checkpoint does not hold `{parameter}` as transformers saves it: "
                                     f"`{key}` {list(shape)} is " + (f"stored as {list(stored[key])}"
                                                                     if key in stored else "missing"))
            functions[key] = functools.partial(share.apply, key)
    return functions


class _ParameterShare:
    """One fused parameter's ΔW, split the way its checkpoint stores the parameter."""

    def __init__(self, parameter, names, deltas, model, shape, stored_fused: bool):
        self.parameter, self.names, self.deltas, self.model = parameter, names, deltas, model
        self.shape, self.stored_fused = shape, stored_fused
        self.parts: dict[str, torch.Tensor] | None = None

    def _converted(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stored_fused:
            return {self.parameter: value}
        from transformers.core_model_loading import revert_weight_conversion

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(revert_weight_conversion(self.model, {self.parameter: value}))

    def layout(self, meta: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Stored names and shapes of this parameter, from the conversion run on the meta tensor."""
        return {key: tuple(t.shape) for key, t in self._converted(meta).items()}

    def apply(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        if self.parts is None:
            delta = expert_stack(self.parameter, self.names, self.deltas, self.shape,
                                 transposed(self.model, self.parameter))
            self.parts = self._converted(delta)
        part = self.parts.pop(key)
        return weight + part.to(device=weight.device, dtype=weight.dtype)


# ---------------------------------------------------------------- evaluation


def parameter_patch(model: torch.nn.Module, parameter: str, names: list[str],
                    deltas: Mapping[str, Delta]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The (parameter, new value) pair that applying the experts' deltas to `parameter` needs:
    each expert's matrix folded as PEFT's merge does (``peftdsl.runtime.fold``)."""
    try:
        weight = model.get_parameter(parameter)
    except AttributeError as error:
        raise KeyError(f"the model has no parameter `{parameter}`") from error
    layout = "conv1d" if transposed(model, parameter) else "linear"
    if weight.dim() == 2:
        if len(names) != 1:
            raise ValueError(f"parameter `{parameter}` is a matrix, but {len(names)} experts adapt it")
        return [(weight, fold_weight(weight, _with_layout(deltas[names[0]], "linear"), name=parameter))]
    if weight.dim() != 3 or weight.shape[0] != len(names):
        raise ValueError(f"parameter `{parameter}` of shape {tuple(weight.shape)} does not hold "
                         f"{len(names)} experts")
    experts = [fold_weight(weight[e], _with_layout(deltas[name], layout), name=expert_name(parameter, e))
               for e, name in enumerate(names)]
    return [(weight, torch.stack(experts))]


def _with_layout(delta: Delta, layout: str) -> Delta:
    return delta if delta.layout == layout or not isinstance(delta, (LoraDelta, DenseDelta)) else \
        dataclasses.replace(delta, layout=layout)
