"""Hooks on transformers' ``PeftAdapterMixin``: adapters attached to a transformers model, no ``PeftModel``.

``model.save_pretrained`` of such a model calls PEFT's ``get_peft_model_state_dict`` (patched by ``enable()``),
so the file carries the extra state; the ``"save"`` hook makes that save atomic, like ``PeftModel.save_pretrained``
(:func:`peft_buffers.binding._save_folder.saving_folder`). Loading and switching:

* transformers 4.x ``load_adapter`` calls ``set_peft_model_state_dict`` (patched), so only switching is hooked;
* transformers 5.x ``load_adapter`` loads the adapter file with its own weight loader, which writes every key
  it can place, the extra state included, straight into the live tensors, whichever adapter is active. The
  ``"load"`` hook validates the file's extra state before anything changes, and afterwards keeps the values
  the loader wrote as the loaded adapter's own, restoring what was live before (the active adapter's values).

Which methods to hook for which transformers release is declared in ``_registry.TRANSFORMERS_REGISTRY``.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Optional

import torch
from packaging.version import Version

from .._errors import PeftBuffersWarning
from ..core import LoadPlan, TensorPlace, plan_load, raise_for_mismatches, verify_adapter_path
from . import _peft_view as pv
from ._base_check import check_base_before_transformers_load
from ._load import load_transaction
from ._save_folder import saving_folder
from ._targets import resolve_target
from .registry import AdapterHook, TransformersEntry, transformers_entry_for

__all__ = ["mixin_min_peft", "plan_transformers_hooks", "transformers_status"]

# Prefix PEFT's save adds to every key; transformers' loaders strip it (4.x by hand, 5.x by a weight renaming).
_SAVED_PREFIX = "base_model.model."
# Hub keyword arguments `load_adapter` forwards through `adapter_kwargs` that `load_peft_weights` also takes.
_HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download", "proxies")

_status: dict[str, Any] = {"transformers": None, "hooked": False, "reason": "enable() not called"}


def transformers_status() -> dict[str, Any]:
    """What the last ``enable()`` did about transformers-native adapters (version, hooked, why not).

    Example:
        >>> sorted(transformers_status())
        ['hooked', 'reason', 'transformers']
    """
    return dict(_status)


def mixin_min_peft() -> Optional[Version]:
    """The oldest PEFT transformers' own adapter methods accept (``add_adapter``, ``load_adapter``, ...), or None.

    Read from the installed transformers (its ``MIN_PEFT_VERSION``, checked by every ``PeftAdapterMixin``
    method, which raises ``ValueError`` below it); None when transformers is missing or declares no minimum.

    Example:
        >>> minimum = mixin_min_peft()
        >>> minimum is None or minimum >= Version("0.5.0")
        True
    """
    try:
        from transformers.integrations import peft as integration
    except ImportError:
        return None
    minimum = getattr(integration, "MIN_PEFT_VERSION", None)
    return Version(minimum) if minimum else None


def _installed_transformers() -> Optional[Version]:
    try:
        return Version(version("transformers"))
    except PackageNotFoundError:
        return None


def plan_transformers_hooks(
    peft_saved_keys: Callable, is_enabled: Callable[[], bool]
) -> list[tuple[Any, str, Callable, Callable]]:
    """``(owner, attribute, original, replacement)`` for every ``PeftAdapterMixin`` method to hook.

    Empty, with the reason in :func:`transformers_status`, when transformers is missing, its version is in no
    ``TRANSFORMERS_REGISTRY`` range, or its methods differ from what the entry expects: the PEFT patch does not
    depend on transformers, so nothing here may stop ``enable()``. Changes nothing itself.
    """
    installed = _installed_transformers()
    _status.update(transformers=str(installed) if installed else None, hooked=False)
    if installed is None:
        _status["reason"] = "transformers is not installed"
        return []
    entry = transformers_entry_for(installed)
    if entry is None:
        _status["reason"] = f"transformers {installed} is in no TRANSFORMERS_REGISTRY range: adapters attached " \
            "with model.add_adapter/load_adapter keep per-adapter extra state only through PEFT's functions"
        return []
    try:
        planned = [_plan_one(hook, entry, peft_saved_keys, is_enabled) for hook in entry.hooks]
    except (ImportError, AttributeError, LookupError) as error:
        _status["reason"] = f"transformers {installed}: {error}"
        warnings.warn(f"peft_buffers: not hooking transformers-native adapters: {error}", PeftBuffersWarning,
                      stacklevel=3)
        return []
    _status.update(hooked=True, reason=f"entry for {entry.versions} (tested with {entry.tested})")
    return planned


def _plan_one(hook: AdapterHook, entry: TransformersEntry, peft_saved_keys: Callable, is_enabled: Callable):
    owner, attr = resolve_target(hook.target)
    original = owner.__dict__.get(attr)
    if original is None:
        raise AttributeError(f"{hook.target} is not defined")
    if hook.kind in ("load", "validate"):
        found = tuple(inspect.signature(original).parameters)[: len(entry.load_signature)]
        if found != entry.load_signature:
            raise LookupError(f"{hook.target} has parameters {found}, the registry entry expects "
                              f"{entry.load_signature}")
    return owner, attr, original, _make_hook(hook.kind, original, peft_saved_keys, is_enabled)


# ------------------------------------------------------------------------------------------------- hooks


def _tuner_layers_disabled(root: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in root.modules() if isinstance(module, BaseTunerLayer)]
    return bool(layers) and all(layer.disable_adapters for layer in layers)


def _switch(root: torch.nn.Module, peft_saved_keys: Callable, deleted: tuple[str, ...] = ()) -> None:
    """Make live the extra state of what computes now; forget the state of ``deleted`` adapters."""
    store = pv.attached_store(root)
    if store is None:
        return
    # transformers' disable_adapters() is a switch, not a context manager: the layers' flag says which.
    store.layers_disabled = _tuner_layers_disabled(root)
    pv.sync(root, peft_saved_keys)
    for name in deleted:
        if name != store.live:
            store.forget(name)


def _make_hook(kind: str, original: Callable, peft_saved_keys: Callable, is_enabled: Callable) -> Callable:
    if kind == "attach":

        @functools.wraps(original)
        def add_adapter(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if is_enabled():
                pv.ensure_store(self, is_enabled)
                _switch(self, peft_saved_keys)
            return result

        return add_adapter

    if kind in ("switch", "delete"):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if is_enabled():
                deleted: tuple[str, ...] = ()
                if kind == "delete":
                    names = signature.bind(self, *args, **kwargs).arguments.get("adapter_names")
                    deleted = (names,) if isinstance(names, str) else tuple(names or ())
                _switch(self, peft_saved_keys, deleted)
            return result

        return method

    if kind == "load":
        return _make_load(original, peft_saved_keys, is_enabled)

    if kind == "save":
        signature = inspect.signature(original)

        @functools.wraps(original)
        def save_pretrained(self, *args, **kwargs):
            if not is_enabled() or not getattr(self, "_hf_peft_config_loaded", False):
                return original(self, *args, **kwargs)  # no adapters: transformers' own full save
            bound = signature.bind(self, *args, **kwargs)
            writes = bound.arguments.get("is_main_process", True)
            folder = bound.arguments["save_directory"]
            if bound.arguments.get("push_to_hub") and extra_name is not None:
                # transformers names the Hub repository after the folder by default: the folder's name, not
                # the staging folder's
                extra = bound.arguments.setdefault(extra_name, {})
                extra.setdefault("repo_id", os.path.basename(os.path.normpath(os.fspath(folder))))
            with saving_folder(self, folder, is_main_process=writes) as target:
                bound.arguments["save_directory"] = target
                return original(*bound.args, **bound.kwargs)

        extra_name = next((name for name, parameter in signature.parameters.items()
                           if parameter.kind is inspect.Parameter.VAR_KEYWORD), None)
        return save_pretrained

    if kind == "validate":
        signature = inspect.signature(original)

        @functools.wraps(original)
        def load_adapter(self, *args, **kwargs):
            if not is_enabled():
                return original(self, *args, **kwargs)
            arguments = _arguments(signature, self, args, kwargs)
            _check_before_loading(self, arguments)
            describe = f"adapter {arguments.get('adapter_name')!r} from {arguments.get('peft_model_id')}"
            with load_transaction(self, describe):
                return original(self, *args, **kwargs)

        return load_adapter

    raise ValueError(f"unknown transformers hook kind {kind!r}")


def _incoming_state_dict(arguments: dict) -> dict[str, torch.Tensor]:
    """The adapter state dict ``load_adapter`` is about to load, read the way PEFT reads adapter files."""
    if arguments.get("adapter_state_dict") is not None:
        return dict(arguments["adapter_state_dict"])
    load_config = arguments.get("load_config")
    model_id = arguments.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
    if model_id is None:
        return {}
    from peft.utils import load_peft_weights

    hub_kwargs = dict(getattr(load_config, "download_kwargs", None) or {})
    hub_kwargs.update(arguments.get("adapter_kwargs") or {})
    hub_kwargs.update(arguments.get("kwargs") or {})
    hub_kwargs.update({k: arguments[k] for k in ("revision", "token") if arguments.get(k) is not None})  # 4.x
    if arguments.get("local_files_only"):
        hub_kwargs["local_files_only"] = True
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
    return load_peft_weights(str(model_id), device="cpu", **hub_kwargs)


def _model_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len(_SAVED_PREFIX):] if k.startswith(_SAVED_PREFIX) else k): v for k, v in state_dict.items()}


def _without_base_layer(key: str) -> str:
    # A tuner keeps the module it wraps as `base_layer`: before the adapter is injected, a key saved as
    # `x.base_layer.weight` names the same tensor as `x.weight` does now.
    return key.replace(".base_layer.", ".")


def _arguments(signature: inspect.Signature, self, args: tuple, kwargs: dict) -> dict:
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _ignore_mismatched_sizes(arguments: dict) -> bool:
    return bool((arguments.get("kwargs") or {}).get("ignore_mismatched_sizes")) or bool(
        getattr(arguments.get("load_config"), "ignore_mismatched_sizes", False)
    )


def _check_before_loading(root: torch.nn.Module, arguments: dict) -> tuple[LoadPlan, dict[str, torch.Tensor]]:
    """Validate the file's extra state against the model as it is before ``load_adapter`` changes anything.

    Every key that can name base-model state now is checked, keys of modules PEFT is about to wrap
    (``modules_to_save``) included: those copy the base module, so they fit whenever it does. Returns the
    plan (its ``extra``: the tensors the load may write) and the incoming state dict with the model's keys.
    """
    model_id = arguments.get("peft_model_id") or getattr(arguments.get("load_config"), "pretrained_model_name_or_path",
                                                         None)
    if model_id is not None and arguments.get("adapter_state_dict") is None:  # the local file, as PEFT's hook does
        subfolder = {**(arguments.get("adapter_kwargs") or {}), **(arguments.get("kwargs") or {})}.get("subfolder")
        verify_adapter_path(model_id, subfolder)
    check_base_before_transformers_load(root, arguments)
    if (arguments.get("adapter_kwargs") or {}).get("key_mapping") or getattr(
        root, "_checkpoint_conversion_mapping", None
    ):
        return LoadPlan(), {}  # keys are renamed by the loader: set_peft_model_state_dict validates (4.x)
    incoming = _model_keys(_incoming_state_dict(arguments))
    before_injection = {_without_base_layer(k): v for k, v in incoming.items()}
    check = plan_load(pv.model_view(root), before_injection,
                      ignore_mismatched_sizes=_ignore_mismatched_sizes(arguments), unknown_keys_are_peft=True)
    raise_for_mismatches(check, arguments.get("adapter_name") or "default")
    return check, incoming


def _make_load(original: Callable, peft_saved_keys: Callable, is_enabled: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        if not is_enabled():
            return original(self, *args, **kwargs)
        arguments = _arguments(signature, self, args, kwargs)
        adapter_name = arguments.get("adapter_name") or "default"
        # 1. Before anything changes: validate.
        check, incoming = _check_before_loading(self, arguments)
        if not check.extra:
            return original(self, *args, **kwargs)  # a stock PEFT file: exactly transformers' behaviour
        with load_transaction(self, f"adapter {adapter_name!r} from {arguments.get('peft_model_id')}"):
            return _load_keeping_extra_state(self, original, args, kwargs, arguments, adapter_name, check, incoming,
                                             peft_saved_keys, is_enabled)

    return load_adapter


def _load_keeping_extra_state(root, original: Callable, args: tuple, kwargs: dict, arguments: dict,
                              adapter_name: str, check: LoadPlan, incoming: dict, peft_saved_keys: Callable,
                              is_enabled: Callable):
    """transformers 5.x ``load_adapter``, then the file's extra state kept as the loaded adapter's own."""
    live_before = {_place_id(place): place.tensor.detach().clone() for place, _ in check.extra.values()}
    places_before = [place for place, _ in check.extra.values()]
    try:
        result = original(root, *args, **kwargs)
    finally:  # transformers' loader wrote the file's values into the live tensors: put back what was live
        for place in places_before:
            place.tensor.data = live_before[_place_id(place)]

    # 2. Now the adapter is injected: PEFT's own keys (modules_to_save, ...) are known. What is left is
    # this adapter's extra state.
    plan = plan_load(pv.model_view(root), incoming,
                     claimed_by_peft=lambda candidates: peft_saved_keys(root, adapter_name, candidates),
                     wraps_for_adapter=pv.wraps_for(adapter_name),
                     ignore_mismatched_sizes=_ignore_mismatched_sizes(arguments))
    # Only tensors checked in step 1 were put back; any other (none by construction) is left alone.
    extra = {k: v for k, v in plan.extra.items() if _place_id(v[0]) in live_before}
    store = pv.ensure_store(root, is_enabled)
    pv.settle(root, store, peft_saved_keys)
    store.set_values(adapter_name, extra, trainable=bool(arguments.get("is_trainable")))
    _switch(root, peft_saved_keys)
    return result


def _place_id(place: TensorPlace) -> tuple[int, str]:
    return id(place.module), place.name
