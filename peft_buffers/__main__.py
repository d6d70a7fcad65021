"""``python -m peft_buffers COMMAND``: the command line lives in :mod:`peft_buffers.cli`."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
