"""Saving: PEFT's ``get_peft_model_state_dict`` wrapped to add the extra state the live adapter owns."""

from __future__ import annotations

import contextvars
import functools
import inspect
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .._errors import PeftBuffersWarning
from .._text import first_names, plural
from ..core import host_copies, is_running_stat
from . import _current
from . import _peft_view as pv
from ._native_fields import model_uses_native_fields
from ._versions import params

__all__ = ["SAVING", "extra_state_dict", "extra_state_for_report", "extra_state_for_save", "make_get",
           "peft_saved_keys_factory"]

#: True while a save_pretrained writes files (set by the "save" hook): extra state then goes to the host at once.
SAVING: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_buffers_saving", default=False)


def peft_saved_keys_factory(original_get: Callable) -> Callable:
    def peft_saved_keys(root, adapter_name: str, candidates: Optional[dict] = None) -> set:
        """Keys PEFT itself saves for ``adapter_name`` (embedding layers included when present).

        With ``candidates`` (key -> live tensor), only which of those PEFT saves: PEFT's own function runs
        on that small state dict instead of the whole model's, which keeps loads cheap.
        """
        if adapter_name is None or adapter_name not in getattr(root, "peft_config", {}):
            return set()
        kwargs = {"adapter_name": adapter_name}
        if "save_embedding_layers" in params(original_get):
            kwargs["save_embedding_layers"] = True
        if candidates is not None:
            if not candidates:
                return set()
            try:
                return set(pv.quiet(original_get, root, state_dict=dict(candidates), **kwargs)) & set(candidates)
            except Exception:  # noqa: BLE001 - some tuners need their full state dict: ask with it below
                pass
        try:
            keys = set(pv.quiet(original_get, root, **kwargs))
        except Exception:  # noqa: BLE001 - a model PEFT cannot save now claims nothing
            return set()
        return keys & set(candidates) if candidates is not None else keys

    return peft_saved_keys


def make_get(original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_peft_model_state_dict(*args, **kwargs):
        result = original(*args, **kwargs)
        if _current.patch is None:
            return result
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model = bound.arguments["model"]
        if bound.arguments.get("unwrap_compiled"):
            model = getattr(model, "_orig_mod", model)
        if model_uses_native_fields(model):  # issue 11: this PEFT saves the model's extra state itself
            return result
        extra = extra_state_for_save(
            model, bound.arguments["adapter_name"], bound.arguments.get("state_dict"), set(result), peft_saved_keys
        )
        result.update(extra)
        return result

    return get_peft_model_state_dict


def extra_state_for_save(root, adapter_name: str, state_dict, peft_keys: set, peft_saved_keys: Callable,
                         occasion: str = "save") -> dict:
    """The extra state to add to ``adapter_name``'s saved state dict: what changed while it was live.

    Keys are the tensors' live state-dict names; values come from ``state_dict`` when the caller passed one
    (FSDP, DeepSpeed gather it), else from the live model or the adapter's stored copy. ``occasion`` is why it
    is asked for: ``"save"`` (PEFT builds a file: what the file lacks or carries inexactly is said in a
    warning), ``"query"`` (:func:`extra_state_dict`: only an inexact result is said) or ``"inspect"``
    (peft_buffers' own reports, which say it themselves: no warning).
    """
    store = pv.ensure_store(root, late=occasion)
    found = pv.settle(root, store, peft_saved_keys)
    store.share_joint()  # each adapter of an active group gets its copy of what changed while it was active
    keys = store.owned_keys(adapter_name)
    if adapter_name == store.live and getattr(store, "late", False):
        keys |= _late_fallback(store, found, adapter_name, root, occasion)
    extra: dict[str, torch.Tensor] = {}
    for key in [k for k in found.ordered if k in keys] + sorted(keys - set(found.ordered)):
        place = found.get(key) or store.places[key]
        saved = place.saved_key
        if saved in peft_keys:
            continue
        if adapter_name != store.live:
            extra[saved] = store.value(adapter_name, key)
        elif state_dict is not None and saved in state_dict:
            extra[saved] = state_dict[saved]
        else:
            tensor = place.tensor
            extra[saved] = tensor.detach() if place.is_parameter else tensor
    if occasion == "save":
        _warn_unsaved(store, adapter_name, found)
        _warn_joint(store, adapter_name, extra.keys(), found)
    if SAVING.get():  # going to a file: one device-to-host copy for all of it, not one per tensor
        extra = host_copies(extra)
    return extra


# Where peft_buffers first saw a model it did not attach to when the model was created (``store.late``).
_FIRST_SEEN = {"save": "at this save", "load": "when an adapter was loaded into it",
               "query": "at a peft_buffers.extra_state_dict call", "inspect": "at a peft_buffers report"}


def _why_unattached(root) -> str:
    """Why no store was attached when ``root`` was created: what peft_buffers hooks tells which."""
    from peft import PeftModel

    if isinstance(root, PeftModel):  # PeftModel.__init__ attaches while peft_buffers is enabled
        return "it was created while peft_buffers was not enabled (call enable() before get_peft_model / " \
               "PeftModel.from_pretrained)"
    if callable(getattr(root, "add_adapter", None)) and callable(getattr(root, "active_adapters", None)):
        return "its adapters were added while peft_buffers was not enabled (call enable() before " \
               "model.add_adapter / load_adapter)"
    return f"peft_buffers attaches to a PeftModel, or at transformers' add_adapter / load_adapter, and this " \
           f"{type(root).__name__} was built otherwise"


def _late_fallback(store, found, adapter_name: str, root, occasion: str) -> set:
    """Keys to carry for a model peft_buffers first saw after its creation: every running statistic and
    trainable parameter (the base values are unknown, so what changed cannot be told)."""
    inside_copies = tuple(f".{child}." for child in store.view.owned_children)  # PEFT saves the trained copy

    def outside(place) -> bool:
        return not any(segment in f".{place.live_key}" for segment in inside_copies)

    keys = {k for k, p in found.buffers.items() if is_running_stat(p) and outside(p)}
    keys |= {k for k, p in found.parameters.items() if p.tensor.requires_grad and outside(p)}
    warned = store.__dict__.setdefault("late_warned", set())
    if keys and occasion in ("save", "query") and occasion not in warned:
        warned.add(occasion)  # once per model and occasion: a file written, a result returned
        seen = _FIRST_SEEN.get(store.late, "late")
        what = (f"the file of adapter {adapter_name!r} carries" if occasion == "save"
                else f"extra_state_dict(model, {adapter_name!r}) returns")
        warnings.warn(
            f"peft_buffers first saw this model {seen}: {_why_unattached(root)}. Its base values are unknown, so "
            f"{what} every running statistic and trainable base parameter ({plural(len(keys), 'tensor')}), "
            f"changed or not.", PeftBuffersWarning, stacklevel=4,
        )
    return keys


def _warn_joint(store, adapter_name: str, saved_keys, found) -> None:
    """Say once, at the first save that carries them, which tensors changed while several adapters were active."""
    groups: dict[tuple, list[str]] = {}
    for key, members in store.joint_changes.items():
        place = found.get(key) or store.places.get(key)
        if adapter_name in members and place is not None and place.saved_key in saved_keys:
            if ("joint", key) not in store.warned:
                store.warned.add(("joint", key))
                groups.setdefault(members, []).append(place.saved_key)
    for members, names in groups.items():
        warnings.warn(
            f"peft_buffers: {plural(len(names), 'tensor')} changed while adapters {', '.join(map(repr, members))} "
            f"were active together; they belong to each of them, and each adapter's file carries them: "
            f"{first_names(sorted(names))}.", PeftBuffersWarning, stacklevel=4)


def _warn_unsaved(store, adapter_name: str, found) -> None:
    """Say which changed base tensors no adapter file will carry, or carry with an unknown base value."""
    messages = []
    unattributed = sorted(set(store.unattributed) - store.warned)
    if unattributed:
        names = first_names(found.get(k).saved_key if found.get(k) else k for k in unattributed)
        them = "them" if len(unattributed) > 1 else "it"
        messages.append(
            f"{plural(len(unattributed), 'base-model tensor')} changed while no adapter was active (e.g. training "
            f"inside disable_adapter()): no adapter file carries {them}, and the base model computes with the "
            f"changed {'values' if len(unattributed) > 1 else 'value'} now: {names}"
        )
    unknown = sorted((store.unknown_base & store.owned_keys(adapter_name)) - store.warned)
    if unknown:
        messages.append(
            f"adapter {adapter_name!r} carries {plural(len(unknown), 'parameter')} changed in place outside an "
            f"optimizer before peft_buffers knew the base value; disable_adapter() and other adapters compute "
            f"with the value first seen: {first_names(unknown)}"
        )
    if messages:
        store.warned.update(unattributed, unknown)
        warnings.warn("peft_buffers: " + " | ".join(messages), PeftBuffersWarning, stacklevel=4)


def extra_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The extra state peft_buffers saves for ``adapter_name`` (default: the active adapter).

    Every base-model buffer and parameter that changed while the adapter was live (or that its file
    carried), minus what PEFT saves itself, keyed as in the adapter file. Works whether or not
    :func:`enable` is on now. A model created while peft_buffers was not enabled has no known base values:
    then the result holds every running statistic and trainable base parameter, changed or not, as a save
    would, and a :class:`~peft_buffers.PeftBuffersWarning` says so (once per model).

    Example:
        >>> import peft_buffers
        >>> from torch import nn
        >>> from peft import LoraConfig, get_peft_model
        >>> _ = peft_buffers.enable()
        >>> model = get_peft_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        ...                        LoraConfig(target_modules=["0"]))
        >>> extra_state_dict(model)  # nothing changed yet
        {}
        >>> _ = model(torch.randn(4, 2))  # a train-mode forward moves the statistics
        >>> sorted(extra_state_dict(model))  # doctest: +NORMALIZE_WHITESPACE
        ['base_model.model.1.num_batches_tracked', 'base_model.model.1.running_mean',
         'base_model.model.1.running_var']
        >>> peft_buffers.disable()
    """
    return _extra_state(model, adapter_name, "query")


def extra_state_for_report(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """:func:`extra_state_dict` for peft_buffers' own reports (``audit``, ``check_reload``): no warning, the
    report says what matters.

    Example:
        >>> from torch import nn
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        ...                        LoraConfig(target_modules=["0"]))  # created without peft_buffers
        >>> sorted(extra_state_for_report(model))  # base values unknown: every running statistic
        ['base_model.model.1.num_batches_tracked', 'base_model.model.1.running_mean', 'base_model.model.1.running_var']
    """
    return _extra_state(model, adapter_name, "inspect")


def _extra_state(model: nn.Module, adapter_name: Optional[str], occasion: str) -> dict[str, torch.Tensor]:
    from peft.utils import save_and_load

    original_get = getattr(save_and_load.get_peft_model_state_dict, "__wrapped__",
                           save_and_load.get_peft_model_state_dict)
    name = adapter_name if adapter_name is not None else pv.active_adapter(model)
    peft_keys = set(pv.quiet(original_get, model, adapter_name=name))
    return extra_state_for_save(model, name, None, peft_keys, peft_saved_keys_factory(original_get), occasion)
