"""Wording shared by every message peft_buffers prints: names escaped, counted nouns, short lists of names
(bottom layer: imports nothing of peft_buffers)."""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["NAME_LIMIT", "SHOWN", "escape", "first_names", "plural"]

SHOWN = 5  # names a message lists before it gives the count of the rest
NAME_LIMIT = 300  # characters of one key, path or value printed in a message


def escape(value: object, limit: int = NAME_LIMIT) -> str:
    r"""``str(value)`` safe to print in a message: what could make it display as something else is escaped.

    Every character that is not printable (control characters, NUL, bidirectional overrides such as U+202E,
    zero-width and line-separator characters) is written as its Python escape (``\x00``, ``\u202e``), as
    ``repr`` writes it, so no name can reorder, hide or fake the text around it. Escaping twice changes nothing
    (a backslash is left alone: a Windows path stays readable). Text longer than ``limit`` characters is cut,
    saying how much was left out.

    Example:
        >>> print(escape("bn.running_mean"))
        bn.running_mean
        >>> print(escape("evil\u202ekey\x00"))
        evil\u202ekey\x00
        >>> print(escape("x" * 10, limit=4))
        xxxx... (6 more characters)
    """
    text = str(value)
    if len(text) > limit:
        text, cut = text[:limit], len(text) - limit
    else:
        cut = 0
    if not text.isprintable():
        text = "".join(_escaped(char) for char in text)
    return f"{text}... ({cut} more characters)" if cut else text


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    if char.isprintable():
        return char
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def plural(count: int, noun: str, many: Optional[str] = None) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1 (``many``: an irregular plural).

    Example:
        >>> plural(1, "tensor"), plural(3, "tensor"), plural(0, "key"), plural(2, "bias", "biases")
        ('1 tensor', '3 tensors', '0 keys', '2 biases')
    """
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def first_names(names: Iterable[str], shown: int = SHOWN) -> str:
    """The first ``shown`` names, escaped (:func:`escape`), comma-separated, then how many
    more there are.

    Example:
        >>> first_names(["a", "b"]), first_names([f"t{i}" for i in range(8)], shown=3)
        ('a, b', 't0, t1, t2, ... (5 more)')
    """
    names = list(names)
    listed = ", ".join(escape(name) for name in names[:shown])
    return listed + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
