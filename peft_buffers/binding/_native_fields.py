"""PEFT's own ``save_running_stats`` / ``parameters_to_save`` config fields (issue 11): peft_buffers steps aside.

The patch series in ``patches/peft-v0.22.0/`` adds these two fields to ``PeftConfig``; a future PEFT release may
merge them. An adapter whose config turns either on has its running statistics and direct parameters saved,
loaded and switched by PEFT itself, so peft_buffers must neither add them to its file nor restore them a second
time. These plain functions answer the two questions; they import nothing but PEFT's config module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["NATIVE_FIELDS", "NATIVE_FIELDS_NOTE", "model_uses_native_fields", "peft_has_native_fields",
           "uses_native_fields"]

NATIVE_FIELDS = ("save_running_stats", "parameters_to_save")
NATIVE_FIELDS_NOTE = (
    "this PEFT has its own save_running_stats / parameters_to_save config fields (patches/peft-v0.22.0, or a "
    "release that merged them): for adapters whose config turns either on, PEFT saves, loads and switches running "
    "statistics and direct parameters itself and peft_buffers steps aside; other adapters are handled as before"
)


def peft_has_native_fields() -> bool:
    """Whether the installed PEFT's ``PeftConfig`` has both fields (patched PEFT, or a release that merged them).

    >>> isinstance(peft_has_native_fields(), bool)
    True
    """
    try:
        from peft import PeftConfig
    except ImportError:
        return False
    names = {field.name for field in dataclasses.fields(PeftConfig)}
    return all(name in names for name in NATIVE_FIELDS)


def uses_native_fields(config: Any) -> bool:
    """Whether this adapter config turns on PEFT's own handling: ``save_running_stats=True`` or a non-empty
    ``parameters_to_save``. False for configs of a PEFT without the fields (the attributes are absent).

    >>> from types import SimpleNamespace
    >>> uses_native_fields(SimpleNamespace(save_running_stats=True))
    True
    >>> uses_native_fields(SimpleNamespace(save_running_stats=False, parameters_to_save=[]))
    False
    >>> uses_native_fields(SimpleNamespace(parameters_to_save=["pos_embed"]))
    True
    """
    return bool(getattr(config, "save_running_stats", False)) or bool(getattr(config, "parameters_to_save", None))


def model_uses_native_fields(model: Any) -> bool:
    """Whether any adapter of ``model`` (anything with a ``peft_config`` dict) uses the fields.

    >>> from types import SimpleNamespace
    >>> model_uses_native_fields(SimpleNamespace(peft_config={"a": SimpleNamespace(save_running_stats=True)}))
    True
    >>> model_uses_native_fields(SimpleNamespace())
    False
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return False
    return any(uses_native_fields(config) for config in configs.values())
