"""Hooks on PEFT's adapter API that change which adapter computes: attach, switch, disable, unload, combine.

Each hook kind of the registry (``AdapterHook.kind``) has a maker here or in :mod:`._io_hooks` (loading,
saving, hotswap, reports); :func:`make_hook` dispatches. Every wrapper calls PEFT's original and then brings
the extra state in line: the adapter that computes now has its own values live.

Tuner methods (``BaseTuner.set_adapter``, ``unload``, ...) run on the tuner, also when called through the
``PeftModel`` (its ``__getattr__`` forwards to the tuner): the tuner records, at attach, the model whose store
holds the extra state (:data:`ROOT_ATTR`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from typing import Callable

from torch import nn

from .._errors import PeftBuffersWarning
from .._text import first_names
from ..core import BASE
from . import _current
from . import _peft_view as pv
from ._native_fields import model_uses_native_fields
from .registry import AdapterHook

__all__ = ["ROOT_ATTR", "after_adapter_change", "make_hook", "root_of"]

#: Attribute of a tuner (``BaseTuner``) naming the ``PeftModel`` / ``PeftMixedModel`` that holds it.
ROOT_ATTR = "_peft_buffers_root"


class _RootRef:
    """A tuner's weak reference to its model: no reference cycle, so a dropped model is freed at once, as with
    stock PEFT. A deep copy refers to the copied model, a pickle to the unpickled one."""

    __slots__ = ("ref",)

    def __init__(self, root: nn.Module):
        self.ref = weakref.ref(root)

    def __deepcopy__(self, memo: dict) -> _RootRef:
        root = self.ref()
        return _RootRef(memo.get(id(root), root))

    def __getstate__(self) -> dict:
        return {"root": self.ref()}

    def __setstate__(self, state: dict) -> None:
        self.ref = weakref.ref(state["root"])


def root_of(obj: nn.Module) -> nn.Module:
    """The model whose store holds ``obj``'s extra state: ``obj`` itself, or for a tuner the model it belongs to.

    A tuner whose model is gone (``get_peft_model(...).unload()`` drops the PeftModel before the call) holds the
    store itself: then the tuner stands for the model.

    Example:
        >>> layer = nn.Linear(1, 1)
        >>> root_of(layer) is layer
        True
    """
    holder = obj.__dict__.get(ROOT_ATTR)
    root = holder.ref() if holder is not None else None
    return root if root is not None else obj


def after_adapter_change(root: nn.Module, peft_saved_keys: Callable) -> None:
    """Make the active adapter's extra state live; forget the extra state of adapters PEFT no longer has.

    A deleted adapter that is still live (PEFT < 0.16 leaves it active until ``set_adapter``) is forgotten at
    the next switch.
    """
    if _current.patch is None or model_uses_native_fields(root):  # that PEFT switches the state itself
        return
    pv.sync(root, peft_saved_keys)
    store = pv.attached_store(root)
    known = getattr(root, "peft_config", None)
    if store is None or not isinstance(known, dict):
        return
    for owner in {*store.owned, *store.stored} - {BASE, store.live, *store.joint} - set(known):
        store.forget(owner)


def _attach(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if _current.patch is not None:
            pv.ensure_store(self, _current.is_enabled)
            tuner = self._modules.get("base_model")
            if tuner is not None and callable(getattr(tuner, "inject_adapter", None)):
                tuner.__dict__[ROOT_ATTR] = _RootRef(self)  # tuner methods find the store through it
                tuner.__dict__[pv.STORE_ATTR] = pv.attached_store(self)  # kept alive while the tuner is

    return init


def _sync(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        after_adapter_change(root_of(self), peft_saved_keys)
        return result

    return method


def _layers(enabled: bool) -> Callable:
    def maker(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            root = root_of(self)
            store = pv.attached_store(root) if _current.patch is not None else None
            if store is not None:
                store.layers_disabled = not enabled
                after_adapter_change(root, peft_saved_keys)
            return result

        return method

    return maker


def _unload(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    def unload(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        root = root_of(self)
        store = pv.attached_store(root) if _current.patch is not None else None
        if store is not None:
            store.unloaded = True  # the base model the call returns computes with its own values from now on
            pv.sync(root, peft_saved_keys)
        return result

    return unload


def _structure(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    def inject_adapter(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _current.patch is not None:
            pv.structure_changed(root_of(self))
        return result

    return inject_adapter


def _combine(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def add_weighted_adapter(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        root = root_of(self)
        store = pv.attached_store(root) if _current.patch is not None else None
        if store is None:
            return result
        arguments = signature.bind(self, *args, **kwargs).arguments
        pv.settle(root, store, peft_saved_keys)
        carried = {name: store.owned_keys(name) for name in arguments.get("adapters") or ()}
        carried = {name: keys for name, keys in carried.items() if keys}
        if carried:
            details = "; ".join(f"{name!r}: {first_names(sorted(keys))}" for name, keys in carried.items())
            warnings.warn(
                f"peft_buffers: add_weighted_adapter combines the adapters' weights only: the new adapter "
                f"{arguments.get('adapter_name')!r} carries no extra state and computes with the base model's "
                f"values where its sources carry their own ({details}).",
                PeftBuffersWarning, stacklevel=2)
        return result

    return add_weighted_adapter


def _forward(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    def __getattr__(self, name):
        value = original(self, name)
        if name != hook.method or _current.patch is None or not callable(value):
            return value

        @functools.wraps(value)
        def forwarded(*args, **kwargs):
            result = value(*args, **kwargs)
            after_adapter_change(self, peft_saved_keys)
            return result

        return forwarded

    return __getattr__


def _disable(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    @functools.wraps(original)
    @contextlib.contextmanager
    def disable_adapter(self, *args, **kwargs):
        with original(self, *args, **kwargs) as value:
            active = _current.patch is not None and not model_uses_native_fields(self)
            store = pv.attached_store(self) if active else None
            if store is None:
                yield value
                return
            store.disabled_depth += 1
            try:
                pv.sync(self, peft_saved_keys)
                yield value
            finally:
                store.disabled_depth -= 1
                pv.sync(self, peft_saved_keys)

    return disable_adapter


MAKERS: dict[str, Callable] = {
    "attach": _attach,
    "sync": _sync,
    "layers_off": _layers(enabled=False),
    "layers_on": _layers(enabled=True),
    "unload": _unload,
    "structure": _structure,
    "combine": _combine,
    "forward": _forward,
    "disable": _disable,
}


def make_hook(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    """The wrapper of ``original`` for ``hook`` (its kind picks the maker).

    Example:
        >>> sorted(set(MAKERS) | {"load"}) [:3]
        ['attach', 'combine', 'disable']
    """
    from ._io_hooks import IO_MAKERS

    maker = MAKERS.get(hook.kind) or IO_MAKERS.get(hook.kind)
    if maker is None:
        raise ValueError(f"unknown adapter hook kind {hook.kind!r}")
    return maker(hook, original, peft_saved_keys)
