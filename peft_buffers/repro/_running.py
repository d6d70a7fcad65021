"""Running a model for the reproducibility tools: outputs as a flat list, compared bitwise, modes put back."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ._common import bitwise_equal, iter_tensors

__all__ = ["adapt", "call", "compare", "main_float", "modes_kept"]


def main_float(model: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    for tensor in model.parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            return tensor.device, tensor.dtype
    return None, None


def adapt(value: Any, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Any:
    """Inputs moved to ``device`` with floating tensors cast to ``dtype`` (what a user of that model does)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() and dtype else value.dtype)
    if isinstance(value, Mapping):
        return {k: adapt(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(adapt(v, device, dtype) for v in value)
    return value


def call(model: nn.Module, inputs: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(inputs, Mapping):
        output = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        output = model(*inputs)
    else:
        output = model(inputs)
    return [(path, tensor.detach()) for path, tensor in iter_tensors(output)]


def compare(a: list, b: list) -> tuple[bool, float, list[str]]:
    """(bitwise equal, max |Δ| over floating outputs, paths that differ)."""
    if [path for path, _ in a] != [path for path, _ in b]:
        return False, float("inf"), ["(output structure)"]
    differing, max_abs = [], 0.0
    for (path, x), (_, y) in zip(a, b):
        if bitwise_equal(x, y):
            continue
        differing.append(path)
        if x.shape != y.shape:
            max_abs = float("inf")
        elif x.numel() and (x.is_floating_point() or y.is_floating_point()):
            delta = (x.to(torch.float64) - y.to(device=x.device, dtype=torch.float64)).abs()
            max_abs = max(max_abs, float(torch.nan_to_num(delta, nan=float("inf")).max()))
        else:
            max_abs = max(max_abs, float("inf") if x.dtype.is_complex else 1.0)
    return not differing, max_abs, differing


@contextlib.contextmanager
def modes_kept(model: nn.Module):
    """Restore every module's own train/eval flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
