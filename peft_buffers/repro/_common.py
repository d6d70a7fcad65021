"""Shared by audit, check_reload and explain: which tensors are base-model tensors, how they are named
for people, and bitwise comparison.

Base-model tensors are found with the core's :class:`~peft_buffers.core.ModelView` (the same walk that
decides what peft_buffers saves), so "base" means the same thing here as in the adapter file: every
parameter and buffer of the base model outside PEFT's own subtrees (adapter weights, ``modules_to_save``
copies). Everything else in the root model is PEFT's ("adapter" tensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .. import binding as pv
from ..core import ModelView

__all__ = [
    "TensorEntry",
    "adapter_tensors",
    "base_tensors",
    "bitwise_equal",
    "byte_view",
    "display_name",
    "saved_layout",
    "short_list",
]

_BASE_LAYER = re.compile(r"(^|\.)base_layer(?=\.|$)")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the model: its state-dict key in the root, the name people see, and where it lives."""

    key: str
    name: str
    module: nn.Module
    attr: str
    is_parameter: bool

    @property
    def tensor(self) -> torch.Tensor:
        table = self.module._parameters if self.is_parameter else self.module._buffers
        return table[self.attr]

    @property
    def what(self) -> str:
        return "parameter" if self.is_parameter else "buffer"


def display_name(key: str, base_prefix: str) -> str:
    """``key`` relative to the base model, without PEFT's ``base_layer`` hop.

    Example:
        >>> display_name("base_model.model.fc.base_layer.weight", "base_model.model.")
        'fc.weight'
    """
    if base_prefix and key.startswith(base_prefix):
        key = key[len(base_prefix) :]
    return _BASE_LAYER.sub("", key).lstrip(".")


def _state_dict_tensors(module: nn.Module):
    """``(is_parameter, attr, tensor)`` for each tensor ``module`` itself puts in the state dict.

    Non-persistent buffers are left out: the model rebuilds them itself (e.g. rotary ``inv_freq``).
    """
    for is_parameter, table in ((True, module._parameters), (False, module._buffers)):
        for attr, tensor in table.items():
            if tensor is None:
                continue
            if not is_parameter and attr in getattr(module, "_non_persistent_buffers_set", ()):
                continue
            yield is_parameter, attr, tensor


def base_tensors(root: nn.Module, view: ModelView | None = None) -> dict[str, TensorEntry]:
    """Every parameter and buffer of the base model, by root state-dict key (a shared tensor once).

    Example:
        >>> [e.name for e in base_tensors(nn.Sequential(nn.BatchNorm1d(2))).values()][:3]
        ['0.weight', '0.bias', '0.running_mean']
    """
    view = view if view is not None else pv.model_view(root)
    entries: dict[str, TensorEntry] = {}
    seen: set[int] = set()
    for prefix, _saved, _base_prefix, module in view.modules():
        for is_parameter, attr, tensor in _state_dict_tensors(module):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            key = f"{prefix}{attr}"
            entries[key] = TensorEntry(key, display_name(key, view.base_prefix), module, attr, is_parameter)
    return entries


def adapter_tensors(root: nn.Module, base: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Every parameter and persistent buffer of ``root`` that is not a base-model tensor: PEFT's own.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> adapter_tensors(net, base_tensors(net))
        {}
    """
    base_ids = {id(entry.tensor) for entry in base.values()}
    prefix = pv.model_view(root).base_prefix
    entries: dict[str, TensorEntry] = {}
    for module_name, module in root.named_modules():
        for is_parameter, attr, tensor in _state_dict_tensors(module):
            if id(tensor) in base_ids:
                continue
            base_ids.add(id(tensor))
            key = f"{module_name}.{attr}" if module_name else attr
            entries[key] = TensorEntry(key, display_name(key, prefix), module, attr, is_parameter)
    return entries


def saved_layout(model: nn.Module) -> None:
    """Bring quantized weights back into the layout they are saved in, when the model has any.

    bitsandbytes repacks 4-bit weights in place for CPU inference on the first eval-mode forward and packs
    them back in its ``state_dict`` hook; comparing raw bytes across that would report a change that is none.
    """
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        model.state_dict()  # for its hooks' effect; holds references only


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat ``uint8`` tensor on its own device (a view when contiguous).

    Example:
        >>> byte_view(torch.tensor([1.0])).tolist()
        [0, 0, 128, 63]
    """
    flat = tensor.detach().reshape(-1)
    try:
        return flat.view(torch.uint8)
    except RuntimeError:
        return flat.contiguous().view(torch.uint8)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors have the same shape, dtype and bytes (NaN equals itself, -0.0 differs from 0.0).

    Example:
        >>> bitwise_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
        True
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if b.device != a.device:
        b = b.to(a.device)
    return torch.equal(byte_view(a), byte_view(b))


def short_list(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``.

    Example:
        >>> short_list(["a", "b", "c", "d", "e"])
        'a, b, c and 2 more'
    """
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def iter_tensors(value: object, path: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside a model output (tensor, ModelOutput/dict, tuple/list), with its path.

    Example:
        >>> [path for path, _ in iter_tensors({"logits": torch.ones(1), "hidden": (torch.ones(1),)})]
        ['output.logits', 'output.hidden[0]']
    """
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        for name in value.keys():
            yield from iter_tensors(value[name], f"{path}.{name}")
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from iter_tensors(item, f"{path}[{index}]")
