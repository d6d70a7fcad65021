"""Hooks on PEFT's adapter API that read or write files or reports: load, from_pretrained, save, hotswap.

Loads run as one transaction after the adapter file's header is checked and the base model compared with the
one the adapter was trained on (:mod:`._base_check`); a save runs inside
:func:`~._save_folder.saving_folder`; a hotswap takes the file's extra state out, validates it like a load,
and writes it into the same tensors (:meth:`~peft_buffers.core.ExtraStateStore.replace_values`), so a compiled
model keeps its graph.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from ..core import plan_load, raise_for_mismatches
from . import _current
from . import _peft_view as pv
from ._base_check import check_base_before_load
from ._healthcheck import extra_state_report
from ._load import atomic_unless_covered, check_file_once, load_transaction
from ._native_fields import model_uses_native_fields
from ._save import SAVING
from ._save_folder import saving_folder
from .registry import AdapterHook

__all__ = ["IO_MAKERS"]


def _subfolder(arguments: dict, kwargs: dict):
    return {**arguments.get("kwargs", {}), **kwargs}.get("subfolder")


def _load(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        if _current.patch is None:
            return original(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs).arguments
        model_id, name = arguments.get("model_id"), arguments.get("adapter_name")
        check_file_once(self, model_id, _subfolder(arguments, kwargs))
        check_base_before_load(self, model_id, _subfolder(arguments, kwargs), name)
        with atomic_unless_covered(self, f"adapter {name!r} from {model_id}"):
            return original(self, *args, **kwargs)

    return load_adapter


def _from_pretrained(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    function = original.__func__
    signature = inspect.signature(function)

    @functools.wraps(function)
    def from_pretrained(cls, *args, **kwargs):
        if _current.patch is None:
            return function(cls, *args, **kwargs)
        arguments = signature.bind(cls, *args, **kwargs).arguments
        model, model_id = arguments["model"], arguments.get("model_id")
        describe = f"adapter {arguments.get('adapter_name', 'default')!r} from {model_id}"
        with load_transaction(model, describe) as transaction:
            check_file_once(model, model_id, _subfolder(arguments, kwargs))
            check_base_before_load(model, model_id, _subfolder(arguments, kwargs), arguments.get("adapter_name"))
            pv.defer_captures(transaction)
            result = function(cls, *args, **kwargs)
            pv.complete_captures(transaction)
            return result

    return _WrappedClassMethod(from_pretrained, original)


def _save(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        if _current.patch is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        writes = bound.arguments.get("is_main_process", True)  # PEFT < 0.7 has none: it writes on every process
        token = SAVING.set(True)
        try:
            with saving_folder(self, bound.arguments["save_directory"], is_main_process=writes) as target:
                bound.arguments["save_directory"] = target
                return original(*bound.args, **bound.kwargs)
        finally:
            SAVING.reset(token)

    return save_pretrained


def _report(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    def healthcheck(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _current.patch is None or model_uses_native_fields(self) or not isinstance(result, dict):
            return result
        added = extra_state_report(self, peft_saved_keys)
        result["peft_buffers"] = added["peft_buffers"]
        result.setdefault("findings", []).extend(added["findings"])
        return result

    return healthcheck


def _hotswap(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def hotswap_adapter(*args, **kwargs):
        if _current.patch is None:
            return original(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        model = arguments["model"]
        root = getattr(model, "_orig_mod", model)  # a torch.compile'd model
        check_file_once(root, arguments.get("model_name_or_path"), _subfolder(arguments, kwargs))
        check_base_before_load(root, arguments.get("model_name_or_path"), _subfolder(arguments, kwargs),
                               arguments.get("adapter_name"))
        return original(*args, **kwargs)

    return hotswap_adapter


def _hotswap_state_dict(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def hotswap_adapter_from_state_dict(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        model = bound.arguments["model"]
        root = getattr(model, "_orig_mod", model)  # a torch.compile'd model: the store is on the module inside
        store = pv.attached_store(root) if _current.patch is not None else None
        if store is None or model_uses_native_fields(root):
            return original(*args, **kwargs)
        adapter_name = bound.arguments["adapter_name"]
        plan = plan_load(
            pv.model_view(root),
            bound.arguments["state_dict"],
            claimed_by_peft=lambda candidates: peft_saved_keys(root, adapter_name, candidates),
            wraps_for_adapter=pv.wraps_for(adapter_name),
            check_values=_current.patch.check_values,
        )
        raise_for_mismatches(plan, adapter_name)  # before anything changes
        bound.arguments["state_dict"] = plan.passthrough
        with load_transaction(root, f"hotswap of adapter {adapter_name!r}") as transaction:
            # PEFT's hotswap writes the adapter's weights in place (tensor.data.copy_), not through
            # load_state_dict: keep them for a rollback, and the extra state this hotswap overwrites.
            transaction.protect(_tensors_named(root, plan.passthrough))
            transaction.protect(place.tensor for place, _ in plan.extra.values())
            result = original(*bound.args, **bound.kwargs)
            pv.settle(root, store, peft_saved_keys, plan.found)  # what the live adapter changed stays its own
            store.replace_values(adapter_name, plan.extra)
        return result

    return hotswap_adapter_from_state_dict


def _tensors_named(root, state_dict) -> list:
    tensors = []
    for key in state_dict:
        owner, _, name = key.rpartition(".")
        try:
            module = root.get_submodule(owner) if owner else root
        except AttributeError:
            continue
        tensor = module._parameters.get(name)
        tensor = tensor if tensor is not None else module._buffers.get(name)
        if tensor is not None:
            tensors.append(tensor)
    return tensors


class _WrappedClassMethod(classmethod):
    """A classmethod whose ``__wrapped__`` is the classmethod object it replaces (what disable() puts back)."""

    def __init__(self, function: Callable, wrapped: classmethod):
        super().__init__(function)
        self._wrapped = wrapped

    @property
    def __wrapped__(self) -> classmethod:  # type: ignore[override]
        return self._wrapped


IO_MAKERS: dict[str, Callable] = {
    "load": _load,
    "from_pretrained": _from_pretrained,
    "save": _save,
    "report": _report,
    "hotswap": _hotswap,
    "hotswap_state_dict": _hotswap_state_dict,
}
