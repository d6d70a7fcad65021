"""Saving: PEFT's ``get_peft_model_state_dict`` wrapped to add the extra state the live adapter owns."""

from __future__ import annotations

import contextvars
import functools
import inspect
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .._errors import PeftBuffersWarning, escape, listing
from ..core import host_copies, is_running_stat
from . import _current
from . import _peft_view as pv
from ._native_fields import model_uses_native_fields
from ._versions import params

__all__ = ["SAVING", "extra_state_dict", "extra_state_for_save", "make_get", "peft_saved_keys_factory"]

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


def extra_state_for_save(root, adapter_name: str, state_dict, peft_keys: set, peft_saved_keys: Callable) -> dict:
    """The extra state to add to ``adapter_name``'s saved state dict: what changed while it was live.

    Keys are the tensors' live state-dict names; values come from ``state_dict`` when the caller passed one
    (FSDP, DeepSpeed gather it), else from the live model or the adapter's stored copy.
    """
    store = pv.ensure_store(root, late=True)
    found = pv.settle(root, store, peft_saved_keys)
    keys = store.owned_keys(adapter_name)
    if adapter_name == store.live and getattr(store, "late", False):
        keys |= _late_fallback(store, found, adapter_name)
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
    _warn_unsaved(store, adapter_name, found)
    if SAVING.get():  # going to a file: one device-to-host copy for all of it, not one per tensor
        extra = host_copies(extra)
    return extra


def _late_fallback(store, found, adapter_name: str) -> set:
    """Keys to save for a model peft_buffers first saw at this save: every running statistic and trainable
    parameter (the base values are unknown, so what changed cannot be told)."""
    inside_copies = tuple(f".{child}." for child in store.view.owned_children)  # PEFT saves the trained copy

    def outside(place) -> bool:
        return not any(segment in f".{place.live_key}" for segment in inside_copies)

    keys = {k for k, p in found.buffers.items() if is_running_stat(p) and outside(p)}
    keys |= {k for k, p in found.parameters.items() if p.tensor.requires_grad and outside(p)}
    if keys and not getattr(store, "late_warned", False):
        store.late_warned = True
        warnings.warn(
            f"peft_buffers saw this model for the first time at save (was peft_buffers.enable() called after "
            f"get_peft_model / from_pretrained?): what training changed is unknown, so adapter "
            f"{adapter_name!r} carries every running statistic and trainable base parameter ({len(keys)} "
            f"tensors). Call enable() before creating the PeftModel for exact files.", PeftBuffersWarning, stacklevel=4,
        )
    return keys


def _warn_unsaved(store, adapter_name: str, found) -> None:
    """Say which changed base tensors no adapter file will carry, or carry with an unknown base value."""
    messages = []
    unattributed = sorted(set(store.unattributed) - store.warned)
    if unattributed:
        names = _names(found.get(k).saved_key if found.get(k) else k for k in unattributed)
        messages.append(
            f"{len(unattributed)} base-model tensor(s) changed while no adapter was active (e.g. training inside "
            f"disable_adapter()): no adapter file carries them, and they are the base model's values now: {names}"
        )
    unknown = sorted((store.unknown_base & store.owned_keys(adapter_name)) - store.warned)
    if unknown:
        messages.append(
            f"adapter {adapter_name!r} carries {len(unknown)} parameter(s) changed in place outside an optimizer "
            f"before peft_buffers knew their base value; disable_adapter() and other adapters compute with the "
            f"value first seen: {_names(unknown)}"
        )
    if messages:
        store.warned.update(unattributed, unknown)
        warnings.warn("peft_buffers: " + " | ".join(messages), PeftBuffersWarning, stacklevel=4)


def _names(keys) -> str:
    """The first keys, escaped, then how many more: a warning stays short however many tensors it is about."""
    return listing((escape(key) for key in keys), what="tensor(s)", separator=", ")


def extra_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The extra state peft_buffers saves for ``adapter_name`` (default: the active adapter).

    Every base-model buffer and parameter that changed while the adapter was live (or that its file
    carried), minus what PEFT saves itself, keyed as in the adapter file. Works whether or not
    :func:`enable` was called (without it, only models created while it was on know their base values).

    Example:
        >>> from torch import nn
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        ...                        LoraConfig(target_modules=["0"]))
        >>> _ = model(torch.randn(4, 2))  # a train-mode forward moves the statistics
        >>> sorted(extra_state_dict(model))  # doctest: +NORMALIZE_WHITESPACE
        ['base_model.model.1.num_batches_tracked', 'base_model.model.1.running_mean',
         'base_model.model.1.running_var']
    """
    from peft.utils import save_and_load

    original_get = getattr(save_and_load.get_peft_model_state_dict, "__wrapped__",
                           save_and_load.get_peft_model_state_dict)
    name = adapter_name if adapter_name is not None else pv.active_adapter(model)
    peft_keys = set(pv.quiet(original_get, model, adapter_name=name))
    return extra_state_for_save(model, name, None, peft_keys, peft_saved_keys_factory(original_get))
