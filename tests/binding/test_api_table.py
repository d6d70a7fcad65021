"""The classified table of PEFT's adapter API is complete for the installed PEFT, and what it hooks is hooked.

Runs on every line of the compatibility matrix: a PEFT release that adds a public method to PeftModel,
PeftMixedModel, the LoRA-family tuners or peft.utils.hotswap fails here until the method is classified, so a new
release cannot add a path that changes which adapter computes without peft_buffers knowing.
"""

from __future__ import annotations

import importlib
import inspect

import peft_buffers
from peft_buffers.binding import patch_status
from peft_buffers.binding._api_table import CLASSES, FUNCTIONS, HOOK_KINDS, classify
from peft_buffers.binding.registry import entry_for

from .._compat import PEFT_VERSION


def _public_methods() -> dict[tuple[str, str], str]:
    """``(class name, method) -> "module:Class.method"`` of the class that defines it, for every public name."""
    import peft.peft_model

    classes = []
    for module_name, class_name in CLASSES:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # a class a line does not have yet (PeftMixedModel before 0.7)
            continue
    peft_model = peft.peft_model
    classes += [c for c in vars(peft_model).values()
                if inspect.isclass(c) and issubclass(c, peft_model.PeftModel) and c.__module__ == peft_model.__name__]
    found = {}
    for cls in classes:
        for name in dir(cls):
            if name.startswith("_"):
                continue
            owner = next(k for k in cls.__mro__ if name in k.__dict__)
            if owner.__module__.startswith("peft"):  # torch's and transformers' own methods are not PEFT's API
                found[(owner.__qualname__, name)] = f"{owner.__module__}:{owner.__qualname__}.{name}"
    for module_name in FUNCTIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # peft.utils.hotswap is new in 0.14
            continue
        for name, value in vars(module).items():
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", "") == module_name:
                found[("", name)] = f"{module_name}:{name}"
    return found


def test_every_public_method_of_the_adapter_api_is_classified():
    unclassified = sorted(f"{cls}.{name}".lstrip(".") for cls, name in _public_methods() if classify(cls, name) is None)
    assert unclassified == [], "classify these in peft_buffers/binding/_api_table.py"


def test_every_method_the_table_hooks_is_hooked_on_this_line():
    hooked = {hook.target for hook in entry_for(PEFT_VERSION).adapter_hooks}
    should = sorted(target for (cls, name), target in _public_methods().items()
                    if classify(cls, name).kind in HOOK_KINDS - {"forward"})
    assert [target for target in should if target not in hooked] == []


def test_every_hook_of_this_line_is_in_place_once_enabled():
    peft_buffers.enable()
    status = {site["site"]: site["patched"] for site in patch_status()["sites"]}
    targets = {hook.target.replace(":", ".") for hook in entry_for(PEFT_VERSION).adapter_hooks}
    assert targets <= set(status) and all(status[t] for t in targets)


def test_every_meaning_is_one_line_a_user_can_read():
    for (cls, name) in _public_methods():
        meaning = classify(cls, name).meaning
        assert meaning and "\n" not in meaning and not meaning.endswith("."), (cls, name)
