"""enable() / disable(): wrap PEFT's state-dict functions at every binding site the registry names.

The wrappers (:mod:`._save`, :mod:`._load`, :mod:`._hooks`) call PEFT's original function and add to (save) or
take from (load) its input and result; no PEFT function body is copied. The registry entry for the installed
release says where the functions are bound, what their signatures are, and which adapter methods to hook.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from .._errors import PeftBuffersError, PeftBuffersWarning, UnsupportedPeftVersion
from ..core import install_optimizer_hook, remove_optimizer_hook
from . import _current, _versions
from ._base_check import BASE_CHECK_MODES
from ._current import Binding, Patch, is_enabled
from ._hooks import make_hook
from ._load import make_set
from ._save import make_get, peft_saved_keys_factory
from ._targets import resolve_target
from ._transformers import plan_transformers_hooks, transformers_status
from .registry import GET, SET, PatchEntry, beyond_table, supported_range

__all__ = ["disable", "enable", "is_enabled", "patch_status"]


def enable(*, allow_untested: bool = False, check_values: bool = True, base_check: str = "warn") -> PatchEntry:
    """Patch PEFT so adapter files carry the base-model state training changed, per adapter.

    Idempotent and thread-safe. Returns the registry entry in use. Raises
    :class:`~peft_buffers.UnsupportedPeftVersion` when the installed PEFT is outside every registry range,
    unless ``allow_untested=True`` (then the newest entry is used, with a warning). With
    ``check_values=False``, files whose running statistics are not finite (or whose variance is negative)
    load anyway instead of raising :class:`~peft_buffers.IncompatibleExtraState`.

    ``base_check``: saving records the identity of the base model in each adapter folder
    (``peft_buffers_base.json``); loading an adapter onto another base (checkpoint, revision, dtype,
    quantization, or values) then ``"warn"`` s with :class:`~peft_buffers.BaseMismatchWarning`, or with
    ``"error"`` raises :class:`~peft_buffers.BaseMismatch` before anything changes; ``"off"`` records and
    checks nothing. Calling ``enable()`` again with other settings updates them.

    Example:
        >>> import peft_buffers
        >>> entry = peft_buffers.enable()
        >>> peft_buffers.is_enabled()
        True
        >>> peft_buffers.disable()
    """
    if base_check not in BASE_CHECK_MODES:
        raise ValueError(f"enable(base_check={base_check!r}): expected one of "
                         f"{', '.join(repr(m) for m in BASE_CHECK_MODES)}")
    with _current.lock:
        if _current.patch is not None:
            _current.patch.check_values = check_values
            _current.patch.base_check = base_check
            return _current.patch.entry
        version = _versions.installed_peft_version()
        entry, untested = _versions.select_entry(version, allow_untested)
        differences = _versions.structure_differences(entry)
        if differences and not allow_untested:
            raise UnsupportedPeftVersion(str(version), supported_range(), differences)
        if differences:
            warnings.warn(f"peft {version} differs from the {entry.line}.x entry ({'; '.join(differences)}); "
                          f"continuing because allow_untested=True.", PeftBuffersWarning, stacklevel=2)
        elif untested and (entry.covers(version) or beyond_table(version)):
            warnings.warn(_versions.untested_message(version, entry), PeftBuffersWarning, stacklevel=2)
        save_and_load = importlib.import_module("peft.utils.save_and_load")
        original_get, original_set = getattr(save_and_load, GET), getattr(save_and_load, SET)
        peft_saved_keys = peft_saved_keys_factory(original_get)

        planned: list[Binding] = []
        replacement = {GET: make_get(original_get, peft_saved_keys), SET: make_set(original_set, peft_saved_keys)}
        for name, sites, original in ((GET, entry.get_sites, original_get), (SET, entry.set_sites, original_set)):
            for site in sites:
                module = importlib.import_module(site)
                if getattr(module, name, None) is not original:
                    raise PeftBuffersError(
                        f"{site}.{name} is not PEFT's original function (found {getattr(module, name, None)!r}); "
                        f"another library may have patched it. Disable that patch first, or fix the registry "
                        f"entry for peft {entry.line}."
                    )
                planned.append(Binding(module, name, original, replacement[name]))
        for hook in entry.adapter_hooks:
            owner, attr = resolve_target(hook.target)
            original = owner.__dict__.get(attr)
            if original is None:
                raise PeftBuffersError(f"{hook.target} is not defined on {owner!r}; fix the registry entry.")
            planned.append(Binding(owner, attr, original, make_hook(hook, original, peft_saved_keys)))
        for owner, attr, original, replacement in plan_transformers_hooks(peft_saved_keys, is_enabled):
            planned.append(Binding(owner, attr, original, replacement))  # transformers-native adapters

        for binding in planned:  # everything checked: now change things
            setattr(binding.owner, binding.attr, binding.replacement)
        install_optimizer_hook()
        _current.patch = Patch(entry=entry, peft_version=str(version), untested=untested, check_values=check_values,
                               base_check=base_check, bindings=planned)
        return entry


def disable() -> None:
    """Undo :func:`enable`: put PEFT's exact original objects back at every binding site. Idempotent.

    Models that already carry extra state keep the values that are live now.

    Example:
        >>> import peft_buffers
        >>> _ = peft_buffers.enable(); peft_buffers.disable(); peft_buffers.is_enabled()
        False
    """
    with _current.lock:
        if _current.patch is None:
            return
        for binding in reversed(_current.patch.bindings):
            setattr(binding.owner, binding.attr, binding.original)
        remove_optimizer_hook()
        _current.patch = None


def _bound(owner: Any, attr: str) -> Any:
    # a class's own attribute as stored (a classmethod object, not the bound method getattr makes of it)
    return owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)


def patch_status() -> dict:
    """What is patched now: PEFT version, registry line, and every binding site with its state.

    Example:
        >>> patch_status()["enabled"] in (True, False)
        True
    """
    with _current.lock:
        patch = _current.patch
        if patch is None:
            return {"enabled": False, "sites": []}
        sites = []
        for b in patch.bindings:
            where = getattr(b.owner, "__name__", repr(b.owner))
            if isinstance(b.owner, type):
                where = f"{b.owner.__module__}.{b.owner.__qualname__}"
            sites.append({"site": f"{where}.{b.attr}", "patched": _bound(b.owner, b.attr) is b.replacement})
        return {
            "enabled": True,
            "peft": patch.peft_version,
            "line": patch.entry.line,
            "tested": patch.entry.tested,
            "untested": patch.untested,
            "sites": sites,
            "transformers": transformers_status(),
        }

