"""Hooks on PEFT's adapter API: attach at construction, switch the live extra state, disable, load atomically."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable

from ..core import BASE
from . import _current
from . import _peft_view as pv
from ._healthcheck import extra_state_report
from ._load import atomic_unless_covered, check_file_once, load_transaction
from ._native_fields import model_uses_native_fields
from ._save import SAVING
from ._save_folder import saving_folder
from .registry import AdapterHook

__all__ = ["after_adapter_change", "make_hook"]


def after_adapter_change(root, peft_saved_keys: Callable) -> None:
    """Make the active adapter's extra state live; forget the extra state of adapters PEFT no longer has.

    A deleted adapter that is still live (PEFT < 0.16 leaves it active until ``set_adapter``) is forgotten at
    the next switch.
    """
    if _current.patch is None or model_uses_native_fields(root):  # issue 11: that PEFT switches the state itself
        return
    pv.sync(root, peft_saved_keys)
    store = pv.attached_store(root)
    known = getattr(root, "peft_config", None)
    if store is None or not isinstance(known, dict):
        return
    for owner in {*store.owned, *store.stored} - {BASE, store.live} - set(known):
        store.forget(owner)


def make_hook(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    if hook.kind == "attach":

        @functools.wraps(original)
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if _current.patch is not None:
                pv.ensure_store(self, _current.is_enabled)

        return init

    if hook.kind == "sync":

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after_adapter_change(self, peft_saved_keys)
            return result

        return method

    if hook.kind == "structure":

        @functools.wraps(original)
        def inject_adapter(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if _current.patch is not None:
                pv.structure_changed(self)
            return result

        return inject_adapter

    if hook.kind == "forward":

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

    if hook.kind == "disable":

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

    if hook.kind == "load":
        signature = inspect.signature(original)

        @functools.wraps(original)
        def load_adapter(self, *args, **kwargs):
            if _current.patch is None:
                return original(self, *args, **kwargs)
            arguments = signature.bind(self, *args, **kwargs).arguments
            model_id, name = arguments.get("model_id"), arguments.get("adapter_name")
            check_file_once(self, model_id, {**arguments.get("kwargs", {}), **kwargs}.get("subfolder"))
            with atomic_unless_covered(self, f"adapter {name!r} from {model_id}"):
                return original(self, *args, **kwargs)

        return load_adapter

    if hook.kind == "from_pretrained":
        function = original.__func__
        signature = inspect.signature(function)

        @functools.wraps(function)
        def from_pretrained(cls, *args, **kwargs):
            if _current.patch is None:
                return function(cls, *args, **kwargs)
            arguments = signature.bind(cls, *args, **kwargs).arguments
            model, model_id = arguments["model"], arguments.get("model_id")
            with load_transaction(model, f"adapter {arguments.get('adapter_name', 'default')!r} from {model_id}"):
                check_file_once(model, model_id, {**arguments.get("kwargs", {}), **kwargs}.get("subfolder"))
                return function(cls, *args, **kwargs)

        return _WrappedClassMethod(from_pretrained, original)

    if hook.kind == "save":
        signature = inspect.signature(original)

        @functools.wraps(original)
        def save_pretrained(self, *args, **kwargs):
            if _current.patch is None:
                return original(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            writes = bound.arguments.get("is_main_process", True)
            token = SAVING.set(True)
            try:
                with saving_folder(self, bound.arguments["save_directory"], is_main_process=writes) as target:
                    bound.arguments["save_directory"] = target
                    return original(*bound.args, **bound.kwargs)
            finally:
                SAVING.reset(token)

        return save_pretrained

    if hook.kind == "report":

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

    raise ValueError(f"unknown adapter hook kind {hook.kind!r}")


class _WrappedClassMethod(classmethod):
    """A classmethod whose ``__wrapped__`` is the classmethod object it replaces (what disable() puts back)."""

    def __init__(self, function: Callable, wrapped: classmethod):
        super().__init__(function)
        self._wrapped = wrapped

    @property
    def __wrapped__(self) -> classmethod:  # type: ignore[override]
        return self._wrapped


