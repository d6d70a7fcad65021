"""What every command shares: the program name its messages start with, and how an error is printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, TextIO

__all__ = ["PROG", "SCRIPT", "print_error", "prog"]

PROG = "python -m peft_buffers"
SCRIPT = "peft-buffers"  # the console script (setup.cfg's entry point): its messages name it instead


def prog() -> str:
    """How the user ran the command line: ``python -m peft_buffers`` or the ``peft-buffers`` script.

    Example:
        >>> prog() in (PROG, SCRIPT)
        True
    """
    return SCRIPT if Path(sys.argv[0]).name == SCRIPT else PROG


def print_error(command: str, message: str, file: Optional[TextIO] = None) -> None:
    """Print ``message`` as every command does, argparse's usage errors included: ``PROG COMMAND: error: ...``.

    Example:
        >>> print_error("inspect", "cannot read x: no such file or directory", file=sys.stdout)
        python -m peft_buffers inspect: error: cannot read x: no such file or directory
    """
    print(f"{prog()} {command}: error: {message}", file=file or sys.stderr)
