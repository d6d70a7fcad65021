"""Wording shared by every message peft_buffers prints: counted nouns and short lists of names (bottom layer)."""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["SHOWN", "first_names", "plural"]

SHOWN = 5  # names a message lists before it gives the count of the rest


def plural(count: int, noun: str, many: Optional[str] = None) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1 (``many``: an irregular plural).

    Example:
        >>> plural(1, "tensor"), plural(3, "tensor"), plural(0, "key"), plural(2, "bias", "biases")
        ('1 tensor', '3 tensors', '0 keys', '2 biases')
    """
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def first_names(names: Iterable[str], shown: int = SHOWN) -> str:
    """The first ``shown`` names, escaped (:func:`peft_buffers._errors.escape`), comma-separated, then how many
    more there are.

    Example:
        >>> first_names(["a", "b"]), first_names([f"t{i}" for i in range(8)], shown=3)
        ('a, b', 't0, t1, t2, ... (5 more)')
    """
    from ._errors import escape  # here, not at the top: _errors imports this module

    names = list(names)
    listed = ", ".join(escape(name) for name in names[:shown])
    return listed + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
