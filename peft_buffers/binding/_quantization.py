"""How a base model is quantized: from its transformers config, else from its quantized weights (duck-typed).

Shared by the base identity an adapter folder records (:mod:`._base_identity`) and by ``check_reload``'s
quantization cause (:mod:`peft_buffers.repro`). bitsandbytes is never imported: its weights are recognised by
their class names (``Params4bit``, ``Int8Params``) and attributes.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..core import find_base_tensors
from . import _peft_view as pv

__all__ = ["describe_model_quantization", "is_quantized", "quantization_settings", "quantized_label",
           "quantized_layers", "saved_layout", "saved_layout_dtype_and_shape"]


def quant_state(tensor: torch.Tensor) -> Any:
    """bitsandbytes' ``quant_state`` of a weight; None for a plain tensor (without an attribute lookup)."""
    kind = type(tensor)
    return None if kind is torch.Tensor or kind is nn.Parameter else getattr(tensor, "quant_state", None)


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a bitsandbytes quantized weight.

    Example:
        >>> is_quantized(torch.zeros(2))
        False
    """
    kind = type(tensor)
    if kind is torch.Tensor or kind is nn.Parameter:  # the common case, without an attribute lookup
        return False
    return kind.__name__ in ("Params4bit", "Int8Params") or hasattr(tensor, "quant_state")


def _is_4bit(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "Params4bit" or getattr(tensor, "quant_state", None) is not None


def quantized_label(tensor: torch.Tensor) -> Optional[str]:
    """What quantizes this weight, in words (``bitsandbytes 4-bit nf4``); None when it is not quantized.

    Example:
        >>> quantized_label(nn.Linear(2, 2).weight) is None
        True
    """
    if not is_quantized(tensor):
        return None
    if _is_4bit(tensor):
        state = getattr(tensor, "quant_state", None)
        kind = getattr(tensor, "quant_type", None) or getattr(state, "quant_type", None)
        return f"bitsandbytes 4-bit {kind}"
    return "bitsandbytes 8-bit"


def saved_layout(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a weight as its ``state_dict`` saves them, without changing the weight.

    bitsandbytes repacks a 4-bit weight for CPU inference on its first eval-mode forward there (and packs it
    back when ``state_dict`` runs); the repacked bytes are undone here on a copy. Any other tensor is returned.

    Example:
        >>> t = torch.ones(2)
        >>> saved_layout(t) is t
        True
    """
    state = quant_state(tensor)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return tensor
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return tensor
    data, _ = _convert_weight_packed_for_cpu_inverse(tensor.data, copy.copy(state))  # it edits the state it gets
    return data


def saved_layout_dtype_and_shape(tensor: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of :func:`saved_layout` (``tensor``), without computing it.

    Example:
        >>> saved_layout_dtype_and_shape(torch.zeros(2, 3))
        (torch.float32, (2, 3))
    """
    state = quant_state(tensor)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        shape = getattr(state, "original_qshape", None)
        if shape is not None:
            return getattr(state, "original_storage_type", None) or torch.uint8, tuple(shape)
    return tensor.dtype, tuple(tensor.shape)


def quantization_settings(root: nn.Module) -> dict[str, Any]:
    """The base model's quantization config (transformers' ``quantization_config``) as flat settings; {} when
    it has none. Keys are the config's own (``bnb_4bit_quant_type``), plus ``bits``.

    Example:
        >>> quantization_settings(nn.Linear(2, 2))
        {}
    """
    base = pv.model_view(root).base
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        config = getattr(getattr(base, "hf_quantizer", None), "quantization_config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    settings: dict[str, Any] = {}
    bits = 4 if raw.get("load_in_4bit") else 8 if raw.get("load_in_8bit") else raw.get("bits")
    settings["bits"] = bits
    for key, value in raw.items():
        if key.startswith("_") or key in ("load_in_4bit", "load_in_8bit", "bits"):
            continue
        if key.startswith("bnb_4bit_") and bits != 4:
            continue
        settings[key] = str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value
    return settings


def quantized_layers(root: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer of the base model (by name): bits, quant type, double quant, block size.

    Example:
        >>> quantized_layers(nn.Linear(2, 2))
        {}
    """
    view = pv.model_view(root)
    layers = {}
    for key, place in find_base_tensors(view).parameters.items():
        tensor = place.tensor
        if not is_quantized(tensor):
            continue
        state = getattr(tensor, "quant_state", None)
        layers[key[len(view.base_prefix):].rsplit(".", 1)[0]] = {
            "bits": 4 if _is_4bit(tensor) else 8,
            "quant type": getattr(tensor, "quant_type", None) or getattr(state, "quant_type", None),
            "double quant": bool(getattr(state, "nested", getattr(tensor, "compress_statistics", False))),
            "blocksize": getattr(tensor, "blocksize", None) or getattr(state, "blocksize", None),
        }
    return layers


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value if isinstance(value, (str, int, float, bool)) or value is None else None


def describe_model_quantization(root: nn.Module, weights: Optional[Iterable[tuple[nn.Module, torch.Tensor]]] = None
                                ) -> Optional[dict[str, Any]]:
    """How the base model is quantized, as plain JSON values; None when it is not.

    bitsandbytes: ``method``, ``bits``, and for 4 bits ``quant_type``, ``compute_dtype``, ``double_quant``,
    ``storage``; from the config when the model has one, else from its quantized layers. Another quantizer:
    ``method`` and the config's scalar ``settings``. ``weights``: the base model's ``(module, weight)`` pairs when
    the caller has them (else the modules are walked).

    Example:
        >>> describe_model_quantization(nn.Linear(2, 2)) is None
        True
    """
    settings = quantization_settings(root)
    method = settings.get("quant_method")
    if hasattr(method, "value"):  # an enum
        method = method.value
    if settings and method not in (None, "bitsandbytes"):
        kept = {k: _scalar(v) for k, v in sorted(settings.items()) if k != "quant_method" and _scalar(v) is not None}
        return {"method": str(method), "settings": kept}
    if settings and settings.get("bits") in (4, 8):
        if settings["bits"] == 8:
            return {"method": "bitsandbytes", "bits": 8}
        return {"method": "bitsandbytes", "bits": 4, "quant_type": settings.get("bnb_4bit_quant_type"),
                "compute_dtype": _scalar(settings.get("bnb_4bit_compute_dtype")),
                "double_quant": bool(settings.get("bnb_4bit_use_double_quant")),
                "storage": _scalar(settings.get("bnb_4bit_quant_storage")) or "uint8"}
    if weights is None:
        weights = ((m, m._parameters.get("weight")) for m in pv.model_view(root).base.modules())
    return _from_layers(weights)


def _from_layers(weights: Iterable[tuple[nn.Module, Optional[torch.Tensor]]]) -> Optional[dict[str, Any]]:
    """The description read from the quantized layers (a model quantized by hand, without a config)."""
    found: Counter = Counter()
    for module, weight in weights:
        if weight is None or not is_quantized(weight):
            continue
        if not _is_4bit(weight):
            found[(("method", "bitsandbytes"), ("bits", 8))] += 1
            continue
        state = getattr(weight, "quant_state", None)
        compute = getattr(module, "compute_dtype", None)
        storage = getattr(weight, "quant_storage", None) or weight.dtype
        found[(("method", "bitsandbytes"), ("bits", 4),
               ("quant_type", getattr(weight, "quant_type", None) or getattr(state, "quant_type", None)),
               ("compute_dtype", _scalar(compute) if compute is not None else None),
               ("double_quant", bool(getattr(weight, "compress_statistics", getattr(state, "nested", False)))),
               ("storage", _scalar(storage)))] += 1
    if not found:
        return None
    return dict(found.most_common(1)[0][0])
