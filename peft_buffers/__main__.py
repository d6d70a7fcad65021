"""Command line: ``python -m peft_buffers {demo,inspect,doctor,convert}``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m peft_buffers`` and the ``peft-buffers`` script.

    Example:
        >>> main(["inspect", "/nonexistent"])  # doctest: +SKIP
        1
    """
    parser = argparse.ArgumentParser(prog="python -m peft_buffers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show the problem and the fix on a small ResNet (CPU, seconds)")
    inspect_parser = commands.add_parser("inspect", help="list what adapter file(s) carry, with bytes")
    inspect_parser.add_argument("dirs", nargs="+", metavar="DIR")
    commands.add_parser("doctor", help="versions, registry entry, binding sites")
    # convert parses its own arguments (peft_buffers/_convert.py): SRC --to-peft VERSION (--out DST | --check)
    commands.add_parser("convert", add_help=False, help="rewrite an adapter folder so an older PEFT release loads it")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from ._demo import main as demo

        return demo(rest)
    if args.command == "inspect":
        from ._inspect import main as inspect

        return inspect(args.dirs)
    if args.command == "convert":
        from ._convert import main as convert

        return convert(rest)
    from ._doctor import main as doctor

    return doctor(rest)


if __name__ == "__main__":
    sys.exit(main())
