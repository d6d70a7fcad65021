"""Find the object a registry target names (``"module.path:Class.method"``). Used by both patch layers."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["resolve_target"]


def resolve_target(target: str) -> tuple[Any, str]:
    """``(owner, attribute)`` for a registry target: the module or class that holds it, and its name.

    Example:
        >>> owner, attr = resolve_target("json:JSONDecoder.decode")
        >>> owner.__name__, attr
        ('JSONDecoder', 'decode')
    """
    module_path, _, attr_path = target.partition(":")
    owner: Any = importlib.import_module(module_path)
    *parents, attr = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attr
