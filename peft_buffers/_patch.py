"""enable() / disable(): wrap PEFT's state-dict functions at every binding site the registry names.

The wrappers call PEFT's original function and add to (save) or take from (load) its input and result;
no PEFT function body is copied. The registry entry for the installed release says where the functions
are bound, what their signatures are, and which adapter-switching methods to hook.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from packaging.version import Version

from . import _peft_view as pv
from ._adapter_file import check_adapter_path
from ._errors import PeftBuffersError, UnsupportedPeftVersion
from ._healthcheck import extra_state_report
from ._integrations import plan_transformers_hooks, transformers_status
from ._load_plan import plan_load, raise_for_mismatches
from ._native_fields import model_uses_native_fields
from ._registry import GET, SET, AdapterHook, PatchEntry, beyond_table, entry_for, newest_entry, supported_range
from ._state import BASE, is_running_stat
from ._store import install_optimizer_hook, remove_optimizer_hook
from ._targets import resolve_target
from ._transaction import active_transaction, atomic

__all__ = ["disable", "enable", "is_enabled", "patch_status"]

_lock = threading.RLock()


@dataclass
class _Binding:
    owner: Any  # module or class
    attr: str
    original: Any
    replacement: Any


@dataclass
class _Patch:
    entry: PatchEntry
    peft_version: str
    untested: bool
    check_values: bool = True
    bindings: list[_Binding] = field(default_factory=list)


_patch: Optional[_Patch] = None


def is_enabled() -> bool:
    """True while peft_buffers' patch is in place.

    Example:
        >>> import peft_buffers
        >>> peft_buffers.disable(); peft_buffers.is_enabled()
        False
    """
    return _patch is not None


def installed_peft_version() -> Version:
    from importlib.metadata import version

    return Version(version("peft"))


def select_entry(version: Version, allow_untested: bool = False) -> tuple[PatchEntry, bool]:
    """The registry entry for ``version`` and whether that exact release is untested.

    A release of a listed line newer than the one CI tests, or a release newer than every line but of the same
    major version, gets the nearest entry and ``untested=True``: :func:`enable` uses it only when the entry's
    structure verifies on the installed PEFT (:func:`structure_differences`). Anything else (older than the
    table, a new major version) raises :class:`UnsupportedPeftVersion`, unless ``allow_untested``.

    Example:
        >>> select_entry(Version(newest_entry().tested))[1]
        False
        >>> select_entry(Version("0.99.0"))[0] is newest_entry()
        True
    """
    entry = entry_for(version)
    if entry is not None:
        return entry, version > Version(entry.tested)
    if beyond_table(version):
        return newest_entry(), True
    if not allow_untested:
        raise UnsupportedPeftVersion(str(version), supported_range())
    entry = newest_entry()
    warnings.warn(
        f"peft {version} is outside every range peft_buffers was tested on; using the entry for "
        f"{entry.line}.x (tested with {entry.tested}) because allow_untested=True.",
        stacklevel=3,
    )
    return entry, True


def _untested_message(version: Version, entry: PatchEntry) -> str:
    if entry.covers(version):
        return (f"peft {version} is newer than {entry.tested}, the release of the {entry.line}.x line that "
                f"peft_buffers was tested with; using that line's patch.")
    return (f"peft {version} is newer than every release peft_buffers was tested with (newest: {entry.tested}); "
            f"its binding sites and adapter methods match the {entry.line}.x entry, so that entry is used. "
            f"`python -m peft_buffers doctor --deep` shows what is patched.")


def _params(fn: Any) -> tuple[str, ...]:
    fn = getattr(fn, "__func__", fn)  # a classmethod object
    return tuple(inspect.signature(fn).parameters)


def structure_differences(entry: PatchEntry) -> list[str]:
    """What the installed PEFT lacks of ``entry``'s structure; empty when the entry applies as written.

    Checked: the parameters of ``get_/set_peft_model_state_dict``; every binding site exists and binds them;
    no other imported PEFT module binds them (a caller the patch would miss); every hooked method is defined on
    its class with the leading parameters its wrapper binds. A function object replaced by another library is
    not a difference of PEFT's: :func:`enable` reports it separately.

    Example:
        >>> structure_differences(select_entry(installed_peft_version(), allow_untested=True)[0])
        []
    """
    import sys

    differences = []
    save_and_load = importlib.import_module("peft.utils.save_and_load")
    originals = {}
    for name, expected, sites in ((GET, entry.get_signature, entry.get_sites),
                                  (SET, entry.set_signature, entry.set_sites)):
        original = getattr(save_and_load, name, None)
        if original is None:
            differences.append(f"peft.utils.save_and_load.{name} does not exist")
            continue
        original = getattr(original, "__wrapped__", original)
        originals[name] = original
        found = _params(original)
        if found[: len(expected)] != expected:
            differences.append(f"{name} has parameters {found}; the {entry.line} entry expects {expected}")
        for site in sites:
            try:
                module = importlib.import_module(site)
            except ImportError as error:
                differences.append(f"binding site {site} does not import ({error})")
                continue
            if not hasattr(module, name):
                differences.append(f"binding site {site} no longer binds {name}")
        unlisted = sorted(module_name for module_name, module in list(sys.modules.items())
                          if (module_name == "peft" or module_name.startswith("peft.")) and module_name not in sites
                          and getattr(module, "__dict__", {}).get(name) is original)
        differences += [f"{module_name} binds {name} but is not a binding site of the {entry.line} entry"
                        for module_name in unlisted]
    for hook in entry.adapter_hooks:
        try:
            owner, attr = resolve_target(hook.target)
        except (ImportError, AttributeError) as error:
            differences.append(f"{hook.target} cannot be found ({error})")
            continue
        method = owner.__dict__.get(attr)
        if method is None:
            differences.append(f"{hook.target} is not defined on {owner.__qualname__}")
            continue
        method = getattr(method, "__wrapped__", method)
        found = _params(method)
        if found[: len(hook.params)] != hook.params:
            differences.append(f"{hook.target} has parameters {found}; its {hook.kind!r} hook expects "
                               f"{hook.params}")
    return differences


# ------------------------------------------------------------------------------------------- wrappers


def _peft_saved_keys_factory(original_get: Callable) -> Callable:
    def peft_saved_keys(root, adapter_name: str, candidates: Optional[dict] = None) -> set:
        """Keys PEFT itself saves for ``adapter_name`` (embedding layers included when present).

        With ``candidates`` (key -> live tensor), only which of those PEFT saves: PEFT's own function runs
        on that small state dict instead of the whole model's, which keeps loads cheap.
        """
        if adapter_name is None or adapter_name not in getattr(root, "peft_config", {}):
            return set()
        kwargs = {"adapter_name": adapter_name}
        if "save_embedding_layers" in _params(original_get):
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


def _make_get(original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_peft_model_state_dict(*args, **kwargs):
        result = original(*args, **kwargs)
        if _patch is None:
            return result
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model = bound.arguments["model"]
        if bound.arguments.get("unwrap_compiled"):
            model = getattr(model, "_orig_mod", model)
        if model_uses_native_fields(model):  # issue 11: this PEFT saves the model's extra state itself
            return result
        extra = _extra_state_for_save(
            model, bound.arguments["adapter_name"], bound.arguments.get("state_dict"), set(result), peft_saved_keys
        )
        result.update(extra)
        return result

    return get_peft_model_state_dict


def _extra_state_for_save(root, adapter_name: str, state_dict, peft_keys: set, peft_saved_keys: Callable) -> dict:
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
            f"tensors). Call enable() before creating the PeftModel for exact files.",
            stacklevel=4,
        )
    return keys


def _warn_unsaved(store, adapter_name: str, found) -> None:
    """Say which changed base tensors no adapter file will carry, or carry with an unknown base value."""
    messages = []
    unattributed = sorted(set(store.unattributed) - store.warned)
    if unattributed:
        names = ", ".join(found.get(k).saved_key if found.get(k) else k for k in unattributed)
        messages.append(
            f"{len(unattributed)} base-model tensor(s) changed while no adapter was active (e.g. training inside "
            f"disable_adapter()): no adapter file carries them, and they are the base model's values now: {names}"
        )
    unknown = sorted((store.unknown_base & store.owned_keys(adapter_name)) - store.warned)
    if unknown:
        messages.append(
            f"adapter {adapter_name!r} carries {len(unknown)} parameter(s) changed in place outside an optimizer "
            f"before peft_buffers knew their base value; disable_adapter() and other adapters compute with the "
            f"value first seen: {', '.join(unknown)}"
        )
    if messages:
        store.warned.update(unattributed, unknown)
        warnings.warn("peft_buffers: " + " | ".join(messages), stacklevel=4)


def _make_set(original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)
    sd_param = _params(original)[1]

    @functools.wraps(original)
    def set_peft_model_state_dict(*args, **kwargs):
        if _patch is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        root = bound.arguments["model"]
        if model_uses_native_fields(root):  # issue 11: this PEFT loads the model's extra state itself
            return original(*args, **kwargs)
        adapter_name = bound.arguments["adapter_name"]
        incoming = bound.arguments[sd_param]
        plan = plan_load(
            pv.model_view(root),
            incoming,
            claimed_by_peft=lambda candidates: peft_saved_keys(root, adapter_name, candidates),
            wraps_for_adapter=pv.wraps_for(adapter_name),
            ignore_mismatched_sizes=bool(bound.arguments.get("ignore_mismatched_sizes", False)),
            check_values=_patch.check_values,
        )
        raise_for_mismatches(plan, adapter_name)  # before anything changes
        for dropped in plan.dropped:
            warnings.warn(f"ignore_mismatched_sizes=True: not loading extra state {dropped}", stacklevel=2)
        describe = f"adapter {adapter_name!r} (set_peft_model_state_dict)"
        if not plan.extra and not plan.dropped:
            with _atomic_unless_covered(root, describe):  # a stock PEFT file: stock behaviour, but atomic
                return original(*args, **kwargs)
        bound.arguments[sd_param] = plan.passthrough
        # The store's own snapshot (ExtraStateStore.__peft_buffers_snapshot__) puts back every tensor it swaps.
        with _atomic_unless_covered(root, describe):
            result = original(*bound.args, **bound.kwargs)
            store = pv.ensure_store(root, late=True)  # not seen at attach: base values unknown
            pv.settle(root, store, peft_saved_keys, plan.found)  # what the live adapter changed stays its own
            config = root.peft_config[adapter_name] if hasattr(root, "peft_config") else None
            trainable = not getattr(config, "inference_mode", True)
            store.set_values(adapter_name, plan.extra, trainable=trainable)
            pv.sync(root, peft_saved_keys)
        if hasattr(result, "missing_keys") and hasattr(result, "_replace"):
            ours = {place.live_key for place, _ in plan.extra.values()} | set(plan.extra)
            ours |= {m.key for m in plan.dropped}
            result = result._replace(missing_keys=[k for k in result.missing_keys if k not in ours])
        return result

    return set_peft_model_state_dict


def _after_adapter_change(root, peft_saved_keys: Callable) -> None:
    """Make the active adapter's extra state live; forget the extra state of adapters PEFT no longer has.

    A deleted adapter that is still live (PEFT < 0.16 leaves it active until ``set_adapter``) is forgotten at
    the next switch.
    """
    if _patch is None or model_uses_native_fields(root):  # issue 11: that PEFT switches the state itself
        return
    pv.sync(root, peft_saved_keys)
    store = pv.attached_store(root)
    known = getattr(root, "peft_config", None)
    if store is None or not isinstance(known, dict):
        return
    for owner in {*store.owned, *store.stored} - {BASE, store.live} - set(known):
        store.forget(owner)


def _make_hook(hook: AdapterHook, original: Callable, peft_saved_keys: Callable) -> Callable:
    if hook.kind == "attach":

        @functools.wraps(original)
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if _patch is not None:
                pv.ensure_store(self, is_enabled)

        return init

    if hook.kind == "sync":

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            _after_adapter_change(self, peft_saved_keys)
            return result

        return method

    if hook.kind == "forward":

        @functools.wraps(original)
        def __getattr__(self, name):
            value = original(self, name)
            if name != hook.method or _patch is None or not callable(value):
                return value

            @functools.wraps(value)
            def forwarded(*args, **kwargs):
                result = value(*args, **kwargs)
                _after_adapter_change(self, peft_saved_keys)
                return result

            return forwarded

        return __getattr__

    if hook.kind == "disable":

        @functools.wraps(original)
        @contextlib.contextmanager
        def disable_adapter(self, *args, **kwargs):
            with original(self, *args, **kwargs) as value:
                store = pv.attached_store(self) if _patch is not None and not model_uses_native_fields(self) else None
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
            if _patch is None:
                return original(self, *args, **kwargs)
            arguments = signature.bind(self, *args, **kwargs).arguments
            model_id, name = arguments.get("model_id"), arguments.get("adapter_name")
            check_adapter_path(model_id, {**arguments.get("kwargs", {}), **kwargs}.get("subfolder"))
            with _atomic_unless_covered(self, f"adapter {name!r} from {model_id}"):
                return original(self, *args, **kwargs)

        return load_adapter

    if hook.kind == "from_pretrained":
        function = original.__func__
        signature = inspect.signature(function)

        @functools.wraps(function)
        def from_pretrained(cls, *args, **kwargs):
            if _patch is None:
                return function(cls, *args, **kwargs)
            arguments = signature.bind(cls, *args, **kwargs).arguments
            model, model_id = arguments["model"], arguments.get("model_id")
            check_adapter_path(model_id, {**arguments.get("kwargs", {}), **kwargs}.get("subfolder"))
            with atomic(model, describe=f"adapter {arguments.get('adapter_name', 'default')!r} from {model_id}"):
                return function(cls, *args, **kwargs)

        return _WrappedClassMethod(from_pretrained, original)

    if hook.kind == "report":

        @functools.wraps(original)
        def healthcheck(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if _patch is None or model_uses_native_fields(self) or not isinstance(result, dict):
                return result
            added = extra_state_report(self, peft_saved_keys)
            result["peft_buffers"] = added["peft_buffers"]
            result.setdefault("findings", []).extend(added["findings"])
            return result

        return healthcheck

    raise ValueError(f"unknown adapter hook kind {hook.kind!r}")


def _atomic_unless_covered(root, describe: str):
    """``atomic(root)``, unless ``PeftModel.from_pretrained`` already runs one on ``root``'s base model: the
    PeftModel it builds is thrown away with any failure, so a second snapshot would only cost time."""
    get_base = getattr(type(root), "get_base_model", None)
    if callable(get_base) and active_transaction(get_base(root)) is not None:
        return contextlib.nullcontext()
    return atomic(root, describe=describe)


class _WrappedClassMethod(classmethod):
    """A classmethod whose ``__wrapped__`` is the classmethod object it replaces (what disable() puts back)."""

    def __init__(self, function: Callable, wrapped: classmethod):
        super().__init__(function)
        self._wrapped = wrapped

    @property
    def __wrapped__(self) -> classmethod:  # type: ignore[override]
        return self._wrapped


# ----------------------------------------------------------------------------------------- enable/disable


def enable(*, allow_untested: bool = False, check_values: bool = True) -> PatchEntry:
    """Patch PEFT so adapter files carry the base-model state training changed, per adapter.

    Idempotent and thread-safe. Returns the registry entry in use. Raises
    :class:`~peft_buffers.UnsupportedPeftVersion` when the installed PEFT is outside every registry range,
    unless ``allow_untested=True`` (then the newest entry is used, with a warning). With
    ``check_values=False``, files whose running statistics are not finite (or whose variance is negative)
    load anyway instead of raising :class:`~peft_buffers.IncompatibleExtraState`.

    Example:
        >>> import peft_buffers
        >>> entry = peft_buffers.enable()
        >>> peft_buffers.is_enabled()
        True
        >>> peft_buffers.disable()
    """
    global _patch
    with _lock:
        if _patch is not None:
            _patch.check_values = check_values
            return _patch.entry
        version = installed_peft_version()
        entry, untested = select_entry(version, allow_untested)
        differences = structure_differences(entry)
        if differences and not allow_untested:
            raise UnsupportedPeftVersion(str(version), supported_range(), differences)
        if differences:
            warnings.warn(f"peft {version} differs from the {entry.line}.x entry ({'; '.join(differences)}); "
                          f"continuing because allow_untested=True.", stacklevel=2)
        elif untested and (entry.covers(version) or beyond_table(version)):
            warnings.warn(_untested_message(version, entry), stacklevel=2)
        save_and_load = importlib.import_module("peft.utils.save_and_load")
        original_get, original_set = getattr(save_and_load, GET), getattr(save_and_load, SET)
        peft_saved_keys = _peft_saved_keys_factory(original_get)

        planned: list[_Binding] = []
        replacement = {GET: _make_get(original_get, peft_saved_keys), SET: _make_set(original_set, peft_saved_keys)}
        for name, sites, original in ((GET, entry.get_sites, original_get), (SET, entry.set_sites, original_set)):
            for site in sites:
                module = importlib.import_module(site)
                if getattr(module, name, None) is not original:
                    raise PeftBuffersError(
                        f"{site}.{name} is not PEFT's original function (found {getattr(module, name, None)!r}); "
                        f"another library may have patched it. Disable that patch first, or fix the registry "
                        f"entry for peft {entry.line}."
                    )
                planned.append(_Binding(module, name, original, replacement[name]))
        for hook in entry.adapter_hooks:
            owner, attr = resolve_target(hook.target)
            original = owner.__dict__.get(attr)
            if original is None:
                raise PeftBuffersError(f"{hook.target} is not defined on {owner!r}; fix the registry entry.")
            planned.append(_Binding(owner, attr, original, _make_hook(hook, original, peft_saved_keys)))
        for owner, attr, original, replacement in plan_transformers_hooks(peft_saved_keys, is_enabled):
            planned.append(_Binding(owner, attr, original, replacement))  # transformers-native adapters

        for binding in planned:  # everything checked: now change things
            setattr(binding.owner, binding.attr, binding.replacement)
        install_optimizer_hook()
        _patch = _Patch(entry=entry, peft_version=str(version), untested=untested, check_values=check_values,
                        bindings=planned)
        return entry


def disable() -> None:
    """Undo :func:`enable`: put PEFT's exact original objects back at every binding site. Idempotent.

    Models that already carry extra state keep the values that are live now.

    Example:
        >>> import peft_buffers
        >>> _ = peft_buffers.enable(); peft_buffers.disable(); peft_buffers.is_enabled()
        False
    """
    global _patch
    with _lock:
        if _patch is None:
            return
        for binding in reversed(_patch.bindings):
            setattr(binding.owner, binding.attr, binding.original)
        remove_optimizer_hook()
        _patch = None


def _bound(owner: Any, attr: str) -> Any:
    # a class's own attribute as stored (a classmethod object, not the bound method getattr makes of it)
    return owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)


def patch_status() -> dict:
    """What is patched now: PEFT version, registry line, and every binding site with its state.

    Example:
        >>> patch_status()["enabled"] in (True, False)
        True
    """
    with _lock:
        if _patch is None:
            return {"enabled": False, "sites": []}
        sites = []
        for b in _patch.bindings:
            where = getattr(b.owner, "__name__", repr(b.owner))
            if isinstance(b.owner, type):
                where = f"{b.owner.__module__}.{b.owner.__qualname__}"
            sites.append({"site": f"{where}.{b.attr}", "patched": _bound(b.owner, b.attr) is b.replacement})
        return {
            "enabled": True,
            "peft": _patch.peft_version,
            "line": _patch.entry.line,
            "tested": _patch.entry.tested,
            "untested": _patch.untested,
            "sites": sites,
            "transformers": transformers_status(),
        }

