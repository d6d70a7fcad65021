"""Whether peft_buffers is enabled, and with which settings: set by enable()/disable(), read by every wrapper."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from .registry import PatchEntry

__all__ = ["Binding", "Patch", "is_enabled", "lock", "patch"]

lock = threading.RLock()


@dataclass
class Binding:
    owner: Any  # module or class
    attr: str
    original: Any
    replacement: Any


@dataclass
class Patch:
    entry: PatchEntry
    peft_version: str
    untested: bool
    check_values: bool = True
    base_check: str = "warn"  # "warn" | "error" | "off": see _base_check.py
    bindings: list[Binding] = field(default_factory=list)


patch: Optional[Patch] = None  # the patch in place, None while disabled


def is_enabled() -> bool:
    """True while peft_buffers' patch is in place.

    Example:
        >>> import peft_buffers
        >>> peft_buffers.disable(); peft_buffers.is_enabled()
        False
    """
    return patch is not None


