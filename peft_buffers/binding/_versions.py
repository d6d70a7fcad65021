"""Which registry entry applies to the installed PEFT, and whether its structure matches that release."""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

from packaging.version import Version

from .._errors import PeftBuffersWarning, UnsupportedPeftVersion
from ._targets import resolve_target
from .registry import GET, SET, PatchEntry, beyond_table, entry_for, newest_entry, supported_range

__all__ = ["installed_peft_version", "select_entry", "structure_differences", "untested_message"]


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
        f"{entry.line}.x (tested with {entry.tested}) because allow_untested=True.", PeftBuffersWarning, stacklevel=3,
    )
    return entry, True


def untested_message(version: Version, entry: PatchEntry) -> str:
    if entry.covers(version):
        return (f"peft {version} is newer than {entry.tested}, the release of the {entry.line}.x line that "
                f"peft_buffers was tested with; using that line's patch.")
    return (f"peft {version} is newer than every release peft_buffers was tested with (newest: {entry.tested}); "
            f"its binding sites and adapter methods match the {entry.line}.x entry, so that entry is used. "
            f"`python -m peft_buffers doctor --deep` shows what is patched.")


def params(fn: Any) -> tuple[str, ...]:
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
        found = params(original)
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
            differences.append(f"{hook.target} is not defined on {getattr(owner, '__qualname__', owner.__name__)}")
            continue
        method = getattr(method, "__wrapped__", method)
        found = params(method)
        if found[: len(hook.params)] != hook.params:
            differences.append(f"{hook.target} has parameters {found}; its {hook.kind!r} hook expects "
                               f"{hook.params}")
    return differences


