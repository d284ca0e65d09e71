"""Adapter sources given in memory (the Python API): a live `PeftModel`, or a state dict with its config.

    peftdsl.load("r.yaml", adapters={"a": peft_model})              # its active adapter
    peftdsl.load("r.yaml", adapters={"a": (peft_model, "sst2")})     # a named adapter of it
    peftdsl.load("r.yaml", adapters={"a": (state_dict, lora_config)})

Each becomes the same `AdapterInfo` a saved adapter gives — the config as PEFT writes
it to `adapter_config.json`, the tensors as `save_pretrained` would store them (PEFT's
own `get_peft_model_state_dict`) — so the checker and the executor treat it exactly as
its saved twin. Its sha256 is that of the safetensors file `save_pretrained` writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from peftdsl.errors import UsageError
from peftdsl.inputs import AdapterInfo, InputError, describe_adapter, state_tensor_infos


def adapter_from_memory(name: str, source: object) -> AdapterInfo:
    """The metadata of an in-memory source; InputError for an adapter peftdsl refuses, as for files."""
    state, config = _state_and_config(name, source)
    return describe_adapter(name, config, state_tensor_infos(state), path=None, weights=None, state=state)


def memory_sha256(info: AdapterInfo) -> str:
    """The sha256 of `adapter_model.safetensors` as `save_pretrained` would write these tensors."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in info.state.items()}
    return hashlib.sha256(save(tensors, metadata={"format": "pt"})).hexdigest()


def _state_and_config(name: str, source: object) -> tuple[dict, dict]:
    import torch

    adapter_name = None
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], str):
        source, adapter_name = source
    if _is_peft_model(source):
        return _from_peft_model(name, source, adapter_name)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
        state, config = source
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise UsageError(f"adapters[{name!r}]: the state dict must map names to tensors")
        return dict(state), _config_dict(name, config)
    raise UsageError(f"adapters[{name!r}] must be a PeftModel, (PeftModel, adapter name) or "
                     f"(state dict, LoraConfig/IA3Config), not {type(source).__name__}")


def _is_peft_model(obj: object) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(obj, PeftModel)


def _from_peft_model(name: str, model, adapter_name: str | None) -> tuple[dict, dict]:
    from peft import get_peft_model_state_dict

    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        known = ", ".join(sorted(model.peft_config))
        raise UsageError(f"adapters[{name!r}]: the model has no adapter `{adapter_name}` (it has: {known})")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return dict(state), _config_dict(name, model.peft_config[adapter_name])


def _config_dict(name: str, config: object) -> dict:
    """The config as `save_pretrained` writes it to adapter_config.json (a JSON round trip)."""
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        raise UsageError(f"adapters[{name!r}]: the config must be a PEFT config or a dict, "
                         f"not {type(config).__name__}")
    try:
        data = json.loads(json.dumps(data, default=_jsonable))
    except (TypeError, ValueError) as err:
        raise InputError("I302", f"adapter `{name}`: its config cannot be written as JSON ({err})") from err
    if "peft_type" not in data:
        raise InputError("I302", f"adapter `{name}`: its config has no `peft_type`")
    return data


def _jsonable(value: object):
    """What PEFT's `to_dict` leaves as Python objects: sets (target_modules) and enums."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON")
