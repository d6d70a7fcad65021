"""Command line of peft_buffers: ``python -m peft_buffers COMMAND`` (or the ``peft-buffers`` script).

The tools layer: it uses :mod:`peft_buffers.binding` and :mod:`peft_buffers.core`, nothing imports it.

Each command lives in its own module, which defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; adding a command is one entry in :data:`COMMANDS`. The module's docstring, as plain
text, is the command's ``--help`` description.
"""

from __future__ import annotations

import argparse
import re
from types import ModuleType
from typing import Optional

from .. import __version__
from .._errors import CommandError
from . import _convert, _demo, _doctor, _inspect
from ._common import print_error
from ._common import prog as _prog

# Order of the list in --help.
COMMANDS: dict[str, ModuleType] = {"demo": _demo, "inspect": _inspect, "doctor": _doctor, "convert": _convert}

DESCRIPTION = ("peft_buffers: PEFT adapter files that also carry the base-model state training changed (running "
               "statistics, trained direct parameters).")
EPILOG = "Run '{prog} COMMAND --help' for the options of a command."


def plain_text(docstring: str) -> str:
    """A docstring as terminal text: reStructuredText literals (double backquotes) and roles removed.

    Example:
        >>> plain_text("``doctor --deep``: see :func:`doctor_report`")
        'doctor --deep: see doctor_report'
    """
    text = re.sub(r":\w+:`([^`]*)`", r"\1", docstring)
    return text.replace("``", "").strip()


def _description(module: ModuleType) -> str:
    # The first line names the command ("python -m peft_buffers doctor: ..."): argparse's usage line already does.
    text = re.sub(r"^python -m peft_buffers [^:]*:\s*", "", plain_text(module.__doc__ or ""))
    return text[:1].upper() + text[1:]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each command's own parser (options from its module's ``add_arguments``).

    Example:
        >>> parser, _ = build_parser()
        >>> parser.parse_args(["doctor", "--json"]).json
        True
    """
    prog = _prog()
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG.format(prog=prog))
    parser.add_argument("--version", action="version", version=f"peft_buffers {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, module in COMMANDS.items():
        parsers[name] = commands.add_parser(name, help=module.HELP, description=_description(module),
                                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parsers[name])
        parsers[name].set_defaults(run=module.run)
    return parser, parsers


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m peft_buffers`` and the ``peft-buffers`` script; returns the exit status.

    Exit status: what the command returns (0 success, 1 a failed check); 2 for a usage error, as argparse
    does, including a :class:`CommandError` a command raises about its arguments.

    Example:
        >>> main(["inspect", "/nonexistent"])  # the message goes to stderr
        1
    """
    parser, parsers = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, so the usage line shown is that command's
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except CommandError as error:
        print_error(args.command, str(error))
        return 2
