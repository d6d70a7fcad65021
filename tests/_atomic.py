"""Helpers for tests of atomic loads (issue 10): what "the model is exactly as before" means, checked.

    before = model_fingerprint(model)
    ...a load that fails...
    assert_unchanged(before, model)

A fingerprint records the module tree (names, module object identities, types), ``state_dict`` keys, every
parameter and buffer (object identity, dtype, device, ``requires_grad`` and the value, compared bitwise), every
``training`` flag, the number of hooks per module, and for PEFT models the ``peft_config`` keys and the active
adapter(s). ``extra`` (a callable model -> comparable value) adds anything else, e.g. per-adapter extra state.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass
class Fingerprint:
    modules: list[tuple[str, int, str]]
    training: dict[str, bool]
    hooks: dict[str, tuple[int, ...]]
    state_dict_keys: list[str]
    tensors: dict[str, tuple[int, torch.dtype, torch.device, bool, torch.Tensor]]
    instance_attrs: dict[str, list[str]]
    peft: dict[str, Any] = field(default_factory=dict)
    extra: Any = None
    keepalive: list = field(default_factory=list, repr=False)  # the recorded objects: their ids stay unique


def _peft_state(model: nn.Module) -> dict[str, Any]:
    state: dict[str, Any] = {}
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        state["peft_config"] = sorted(config)
        state["peft_config_objects"] = {name: id(value) for name, value in config.items()}
    for name in ("active_adapter", "active_adapters"):
        try:
            value = getattr(model, name)
        except Exception:  # noqa: BLE001 - PEFT raises for some models without adapters
            continue
        state[name] = list(value) if isinstance(value, (list, tuple, set)) else value
    return state


def model_fingerprint(model: nn.Module, extra: Optional[Callable[[nn.Module], Any]] = None) -> Fingerprint:
    """Everything a failed load must leave as it was, recorded from ``model`` now (values cloned)."""
    extra_value = extra(model) if extra is not None else None  # first: reading it may attach state to the model
    named = list(model.named_modules(remove_duplicate=False))
    tensors = {}
    for prefix, module in named:
        for kind in ("_parameters", "_buffers"):
            for name, tensor in module.__dict__[kind].items():
                key = f"{prefix}.{name}" if prefix else name
                if tensor is None:
                    tensors[key] = None
                    continue
                tensors[key] = (id(tensor), tensor.dtype, tensor.device, tensor.requires_grad,
                                tensor.detach().clone())
    return Fingerprint(
        modules=[(name, id(module), type(module).__qualname__) for name, module in named],
        training={name: module.training for name, module in named},
        hooks={name: tuple(len(module.__dict__.get(h, ())) for h in _HOOK_DICTS) for name, module in named},
        state_dict_keys=list(model.state_dict()),
        tensors=tensors,
        instance_attrs={name: sorted(module.__dict__) for name, module in named},
        peft=_peft_state(model),
        extra=extra_value,
        keepalive=[module for _, module in named] + [t for _, m in named for t in m._parameters.values()]
        + [t for _, m in named for t in m._buffers.values()],
    )


def _equal(a: Any, b: Any) -> bool:
    """Deep equality where tensors compare bitwise (dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def extra_state_of_every_adapter(model: nn.Module) -> dict:
    """``extra=`` for the fingerprint: peft_buffers' extra state of each adapter (cloned), keyed by adapter."""
    from peft_buffers import extra_state_dict

    return {name: {k: v.detach().clone() for k, v in extra_state_dict(model, name).items()}
            for name in sorted(getattr(model, "peft_config", {}))}


def differences(before: Fingerprint, model: nn.Module, extra: Optional[Callable[[nn.Module], Any]] = None
                ) -> list[str]:
    """What changed in ``model`` since ``before`` (empty: nothing), one line per difference."""
    after = model_fingerprint(model, extra)
    found = []
    if before.modules != after.modules:
        gone = [m for m in before.modules if m not in after.modules]
        new = [m for m in after.modules if m not in before.modules]
        found.append(f"module tree differs: gone {gone[:5]}, new {new[:5]}")
    for what in ("training", "hooks", "instance_attrs", "peft"):
        old, new = getattr(before, what), getattr(after, what)
        if old != new:
            keys = sorted({*old, *new}, key=str)
            changed = [k for k in keys if old.get(k) != new.get(k)]
            found.append(f"{what} differs at {changed[:5]}: {[old.get(k) for k in changed[:3]]} -> "
                         f"{[new.get(k) for k in changed[:3]]}")
    if before.state_dict_keys != after.state_dict_keys:
        old_keys, new_keys = set(before.state_dict_keys), set(after.state_dict_keys)
        found.append(f"state_dict keys differ: gone {sorted(old_keys - new_keys)[:5]}, "
                     f"new {sorted(new_keys - old_keys)[:5]}")
    if set(before.tensors) != set(after.tensors):
        found.append(f"tensor names differ: {sorted(set(before.tensors) ^ set(after.tensors))[:5]}")
    for key in sorted(set(before.tensors) & set(after.tensors)):
        old, new = before.tensors[key], after.tensors[key]
        if old is None or new is None:
            if old is not new:
                found.append(f"{key}: None-ness changed")
            continue
        if old[:4] != new[:4]:
            found.append(f"{key}: (identity, dtype, device, requires_grad) {old[:4]} -> {new[:4]}")
        elif old[2].type != "meta" and not torch.equal(old[4], new[4]):
            found.append(f"{key}: values differ")
    if extra is not None and not _equal(before.extra, after.extra):
        found.append(f"extra state differs: {before.extra!r:.300} -> {after.extra!r:.300}")
    return found


def assert_unchanged(before: Fingerprint, model: nn.Module, extra: Optional[Callable[[nn.Module], Any]] = None
                     ) -> None:
    """Fail with every difference listed unless ``model`` is exactly as recorded in ``before``."""
    found = differences(before, model, extra)
    assert not found, "the model changed:\n" + "\n".join(found)


def assert_changed(before: Fingerprint, model: nn.Module) -> list[str]:
    """The differences (at least one): used to show a case does change the model without the transaction."""
    found = differences(before, model)
    assert found, "expected the model to have changed"
    return found


class FailAt:
    """Calls ``function``, except the ``at``-th call, which fails as a full disk does (a write first writes half
    of what it was asked to, as ``write_half`` says how)."""

    def __init__(self, function, at: int, write_half=None):
        self.function, self.at, self.write_half, self.calls = function, at, write_half, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            if self.write_half is not None:
                self.write_half(self.function, *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.function(*args, **kwargs)
