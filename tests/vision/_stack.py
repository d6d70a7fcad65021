"""Skip a test module cleanly where the vision stack (torchvision, timm) is not installed."""

from __future__ import annotations

import importlib.util

import pytest

MISSING = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name) is None]
REASON = f"needs {' and '.join(MISSING)}: the real-model tests run in `nox -s vision` (issue 9)"


def require_vision_stack() -> None:
    """Skip the calling test module unless torchvision and timm import."""
    if MISSING:
        pytest.skip(REASON, allow_module_level=True)
