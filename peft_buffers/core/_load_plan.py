"""The core, part 2: sort an incoming adapter state dict into extra state and PEFT's keys, and validate it.

Plain torch. :func:`plan_load` reads nothing but the model and the state dict, and changes nothing: a load
that fails validation fails before any tensor is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from .._errors import ExtraStateMismatch, IncompatibleExtraState
from ._state import (
    _TRANSPARENT_SEGMENTS,
    OWNED,
    RUNNING_STAT_NAMES,
    BaseTensors,
    ModelView,
    TensorPlace,
    find_base_tensors,
    tracks_running_stats,
)

__all__ = ["LoadPlan", "plan_load", "raise_for_mismatches", "resolve_key"]


@dataclass
class LoadPlan:
    """What a load will do: which incoming keys are extra state (with their converted values), which are
    left to PEFT, and every mismatch found. Built by :func:`plan_load` without touching the model."""

    extra: dict[str, tuple[TensorPlace, torch.Tensor]] = field(default_factory=dict)
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    mismatches: list[ExtraStateMismatch] = field(default_factory=list)
    dropped: list[ExtraStateMismatch] = field(default_factory=list)
    found: Optional[BaseTensors] = None  # the walk the plan was made from (callers reuse it)


@dataclass(frozen=True)
class _Unresolved:
    parent: str  # live path of the deepest module found
    missing: str  # the segment (module or attribute) that is not there
    module: Optional[nn.Module]  # set when only the attribute is missing


@dataclass(frozen=True)
class _PeftOwned:
    pass


_PEFT = _PeftOwned()


def resolve_key(
    view: ModelView, key: str, wraps_for_adapter: Callable[[nn.Module], bool] = lambda module: False
) -> Union[TensorPlace, _Unresolved, _PeftOwned]:
    """Map a file key to the base-model tensor it names, whatever wrappers adapters added or removed since.

    A ``base_layer.`` / ``original_module.`` segment the saving model had is skipped where this model has no
    wrapper; a wrapper this model has and the key does not name is stepped through. A key below an adapter's
    own children (``lora_A``, ``modules_to_save``), outside the base model, or through a ``modules_to_save``
    wrapper that holds the loading adapter's copy (``wraps_for_adapter``) is PEFT's.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> resolve_key(ModelView(base=net), "0.base_layer.running_mean").key
        '0.running_mean'
    """
    if not key.startswith(view.base_prefix):
        return _PEFT
    parts = key[len(view.base_prefix) :].split(".")
    module = view.base
    live, canon = view.base_prefix, view.base_prefix
    wrapper_segments = set(view.partial_children) | set(view.owned_children)

    def enter_wrappers(module: nn.Module, live: str, want: Optional[str]):
        """Step through wrappers until ``want`` is a child of the module (or no wrapper is left)."""
        while True:
            allowed = view.wrapper_children(module)
            if allowed is None or (want is not None and want in allowed):
                return module, live, False
            if want is not None and want in module._modules:
                return module, live, True  # an adapter's own child: PEFT's
            if view.kind(module) is OWNED and wraps_for_adapter(module):
                return module, live, True
            inner = next((c for c in allowed if module._modules.get(c) is not None), None)
            if inner is None:
                return module, live, False
            module, live = module._modules[inner], f"{live}{inner}."

    for part in parts[:-1]:
        module, live, peft_owned = enter_wrappers(module, live, part)
        if peft_owned:
            return _PEFT
        allowed = view.wrapper_children(module)
        if allowed is not None and part in allowed:
            if view.kind(module) is OWNED and wraps_for_adapter(module):
                return _PEFT
            module, live = module._modules[part], f"{live}{part}."
            continue
        if part in wrapper_segments and part not in module._modules:
            continue  # the saving model had a wrapper here; this one has none
        child = module._modules.get(part)
        while child is None:
            hop = next((s for s in _TRANSPARENT_SEGMENTS if s in module._modules), None)
            if hop is None:
                return _Unresolved(live.rstrip(".") or "the base model", part, None)
            module = module._modules[hop]
            child = module._modules.get(part)
        module, live, canon = child, f"{live}{part}.", f"{canon}{part}."
    name = parts[-1]
    while True:
        if name in module._parameters and module._parameters[name] is not None:
            return TensorPlace(canon + name, module, name, True, live + name)
        if name in module._buffers and module._buffers[name] is not None:
            return TensorPlace(canon + name, module, name, False, live + name)
        allowed = view.wrapper_children(module)
        if allowed is None:
            return _Unresolved(live.rstrip(".") or "the base model", name, module)
        if name in module._modules or _names_adapter_state(module, name):  # LoHa's hada_w1_a, SHiRA's indices
            return _PEFT
        if view.kind(module) is OWNED and wraps_for_adapter(module):
            return _PEFT
        inner = next((c for c in allowed if module._modules.get(c) is not None), None)
        if inner is None:
            return _Unresolved(live.rstrip(".") or "the base model", name, module)
        module, live = module._modules[inner], f"{live}{inner}."


def _names_adapter_state(module: nn.Module, name: str) -> bool:
    """Whether ``name`` is a tuner layer's own per-adapter state: an attribute of the layer itself, or one of
    the names a PEFT tuner layer declares (``adapter_layer_names``, ``other_param_names``)."""
    if name in module.__dict__:
        return True
    declared = (*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ()))
    return any(name == n or name.startswith(f"{n}_") for n in declared)


_FIX_SHAPE = (
    "the base model differs from the one the adapter was trained on (was it resized, e.g. another image "
    "size or number of channels?): create it with the same config as in training"
)
_FIX_MISSING = (
    "the base model lacks this module: create it with the same architecture and config as in training, "
    "or remove the key from the adapter file if it is not needed"
)
_FIX_NO_ATTRIBUTE = (
    "the module at this position has no such parameter or buffer: create the base model with the same "
    "architecture and config as in training, or remove the key from the adapter file"
)
_FIX_NO_STATS = (
    "create the base model with track_running_stats=True for this layer, as in training, or drop the key "
    "from the adapter file"
)
_FIX_DTYPE = "convert the tensor in the adapter file to a dtype of the same kind, or rebuild the base model"
_FIX_VALUES = (
    "the run that wrote this file diverged or the file is corrupted: retrain or use an earlier checkpoint; "
    "to load it anyway call peft_buffers.enable(check_values=False)"
)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _resizes_its_buffers(module: nn.Module) -> bool:
    # Quantization observers and fake-quant modules start with empty or scalar buffers and resize them on the
    # first forward (per-channel qparams); torch's own loader accepts any shape for them too.
    return callable(getattr(module, "calculate_qparams", None))


def _bad_values(key: str, value: torch.Tensor) -> Optional[ExtraStateMismatch]:
    """A running statistic the model cannot compute with: non-finite mean or variance, negative variance."""
    if not value.is_floating_point() or value.numel() == 0:
        return None
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        return ExtraStateMismatch(key, "running statistic has non-finite values", "finite values",
                                  f"{bad} NaN/Inf {'value' if bad == 1 else 'values'} of {value.numel()}", _FIX_VALUES)
    if key.endswith("running_var") and bool((value < 0).any()):
        lowest = float(value.min())
        return ExtraStateMismatch(key, "running variance is negative", "values >= 0",
                                  f"min {lowest if math.isfinite(lowest) else lowest!r}", _FIX_VALUES)
    return None


def plan_load(
    view: ModelView,
    state_dict: Mapping[str, torch.Tensor],
    *,
    claimed_by_peft: Callable[[Mapping[str, torch.Tensor]], set] = lambda candidates: set(),
    wraps_for_adapter: Callable[[nn.Module], bool] = lambda module: False,
    ignore_mismatched_sizes: bool = False,
    check_values: bool = True,
    unknown_keys_are_peft: bool = False,
    found: Optional[BaseTensors] = None,
) -> LoadPlan:
    """Sort an incoming adapter state dict into extra state and PEFT's own keys, and validate the extra state.

    A key is extra state when it names a buffer or a parameter of the base model (through any wrapper, see
    :func:`resolve_key`) that PEFT does not claim: ``claimed_by_peft`` gets the live tensors named by those
    keys (key -> tensor) in one call and returns the keys PEFT loads itself. Mismatches: a key that names no
    module or no tensor of the base model, a running statistic of a module without statistics, a shape that
    differs (quantization observers excepted: they resize), a dtype of another kind (float vs integer), and,
    with ``check_values``, a running statistic that is not finite or a negative variance. Converted values
    take the device and dtype of the model's tensors. With ``ignore_mismatched_sizes``, shape mismatches are
    dropped (reported in ``plan.dropped``) instead. ``unknown_keys_are_peft`` passes keys that name nothing
    to PEFT instead (for a check made before PEFT injects the adapter whose modules those keys name).
    ``found``: a walk of the model made since its last structural change, reused instead of walking again.

    Example:
        >>> view = ModelView(base=nn.BatchNorm1d(2))
        >>> plan = plan_load(view, {"running_mean": torch.ones(2), "lora_A.weight": torch.ones(1)})
        >>> sorted(plan.extra), [m.key for m in plan.mismatches]
        (['running_mean'], ['lora_A.weight'])
    """
    plan = LoadPlan(found=found if found is not None else find_base_tensors(view))
    # One walk, then O(1) per key for names as this model has them and for keys under an adapter's own modules;
    # other names are resolved step by step. A tensor inside a modules_to_save wrapper is saved under its base
    # name, which is also the name of the adapter's own copy: those keys always go through resolve_key, which
    # asks wraps_for_adapter.
    direct = {p.live_key: p for p in plan.found.ordered.values() if p.live_key == p.saved_key}
    adapter_prefixes = plan.found.adapter_prefixes
    tracking: dict[int, bool] = {}  # id(module) -> tracks_running_stats(module): asked once per module

    def tracks(module: nn.Module) -> bool:
        known = tracking.get(id(module))
        if known is None:
            known = tracking[id(module)] = tracks_running_stats(module)
        return known

    candidates: list[tuple[str, TensorPlace, torch.Tensor]] = []
    for key, value in state_dict.items():
        target = direct.get(key)
        if target is None:
            target = _PEFT if _is_under(key, adapter_prefixes) else resolve_key(view, key, wraps_for_adapter)
        if target is _PEFT:
            plan.passthrough[key] = value
            continue
        last = key[key.rfind(".") + 1 :]
        if isinstance(target, _Unresolved):
            if unknown_keys_are_peft and last not in RUNNING_STAT_NAMES:
                plan.passthrough[key] = value
                continue
            plan.mismatches.append(_unresolved_mismatch(key, last, target))
            continue
        if last in RUNNING_STAT_NAMES and not target.is_parameter and not tracks(target.module):
            module = target.module
            plan.mismatches.append(
                ExtraStateMismatch(
                    key, "the module keeps no running statistics", f"{type(module).__name__} with "
                    "track_running_stats=True", f"{type(module).__name__} without running buffers", _FIX_NO_STATS,
                )
            )
            continue
        candidates.append((key, target, value))
    params = {key: place.tensor for key, place, _ in candidates if place.is_parameter}
    claimed = claimed_by_peft(params) if params else set()
    statistics: list[tuple[str, torch.Tensor]] = []
    for key, place, value in candidates:
        if key in claimed:
            plan.passthrough[key] = value
            continue
        converted = _checked_value(key, place, value, plan, ignore_mismatched_sizes)
        if converted is None:
            continue
        plan.extra[key] = (place, converted)
        if check_values and place.name in ("running_mean", "running_var") and tracks(place.module):
            statistics.append((key, value))
    for bad in _bad_statistics(statistics):
        plan.mismatches.append(bad)
        del plan.extra[bad.key]
    return plan


def _is_under(key: str, prefixes: frozenset) -> bool:
    """Whether ``key`` starts with one of ``prefixes`` (each ends with a dot), checked at every dot of ``key``."""
    if not prefixes:
        return False
    dot = key.find(".")
    while dot != -1:
        if key[: dot + 1] in prefixes:
            return True
        dot = key.find(".", dot + 1)
    return False


def _bad_statistics(statistics: list[tuple[str, torch.Tensor]]) -> list[ExtraStateMismatch]:
    """The running statistics among ``statistics`` the model cannot compute with (see :func:`_bad_values`).

    All of them are checked together, one reduction and one host sync per device and dtype; only when a group
    fails is each of its tensors looked at.
    """
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for key, value in statistics:
        if value.is_floating_point() and value.numel():
            groups.setdefault((value.device, value.dtype), []).append((key, value))
    bad: list[ExtraStateMismatch] = []
    for members in groups.values():
        flat = torch.cat([value.reshape(-1) for _, value in members])
        variances = [value.reshape(-1) for key, value in members if key.endswith("running_var")]
        ok = torch.isfinite(flat).all()
        if variances:
            ok = ok & (torch.cat(variances) >= 0).all()
        if bool(ok):
            continue
        bad += [found for found in (_bad_values(key, value) for key, value in members) if found is not None]
    return bad


def _unresolved_mismatch(key: str, last: str, target: _Unresolved) -> ExtraStateMismatch:
    if target.module is None:
        return ExtraStateMismatch(key, "names no module of the base model", f"a module at {key.rsplit('.', 1)[0]}",
                                  f"no module {target.missing!r} in {target.parent}", _FIX_MISSING)
    if last in RUNNING_STAT_NAMES:
        module = type(target.module).__name__
        return ExtraStateMismatch(key, "the module keeps no running statistics", f"{module} with "
                                  "track_running_stats=True", f"{module} without running buffers", _FIX_NO_STATS)
    names = sorted({*target.module._parameters, *target.module._buffers})
    return ExtraStateMismatch(
        key, "names no parameter or buffer of the base model",
        f"a tensor {target.missing!r} in {target.parent} ({type(target.module).__name__})",
        f"only {names}" if names else "no tensors there", _FIX_NO_ATTRIBUTE,
    )


def _checked_value(
    key: str, place: TensorPlace, value: torch.Tensor, plan: LoadPlan, ignore_sizes: bool
) -> Optional[torch.Tensor]:
    live = place.tensor
    if value.shape != live.shape and not (not place.is_parameter and _resizes_its_buffers(place.module)):
        mismatch = ExtraStateMismatch(
            key, f"{place.kind} has another shape", f"shape {tuple(live.shape)} (the model's)",
            f"shape {tuple(value.shape)} (the file's)", _FIX_SHAPE,
        )
        (plan.dropped if ignore_sizes else plan.mismatches).append(mismatch)
        return None
    if value.dtype != live.dtype and _dtype_kind(value.dtype) != _dtype_kind(live.dtype):
        plan.mismatches.append(
            ExtraStateMismatch(
                key, f"{place.kind} has a dtype of another kind", f"a {_dtype_kind(live.dtype)} dtype "
                f"like the model's {live.dtype}", f"{value.dtype}", _FIX_DTYPE,
            )
        )
        return None
    if live.device.type == "meta":
        return value
    # Always a fresh tensor laid out like the model's (its strides, dtype and device): the caller's tensor is never
    # adopted as model storage (a later change to their state dict would change the model), and a file's tensor
    # sits at an arbitrary offset of safetensors' buffer, where vectorised CPU kernels may round differently
    # (reloaded spectral-norm outputs differed in the last bit). Stock load_state_dict copies into the model too.
    fresh = torch.empty_like(live) if value.shape == live.shape else live.new_empty(value.shape)
    return fresh.copy_(value)


def raise_for_mismatches(plan: LoadPlan, adapter_name: str) -> None:
    """Raise :class:`IncompatibleExtraState` when the plan found any mismatch.

    Example:
        >>> raise_for_mismatches(LoadPlan(), "default")  # nothing found: nothing raised
    """
    if plan.mismatches:
        raise IncompatibleExtraState(adapter_name, plan.mismatches)
