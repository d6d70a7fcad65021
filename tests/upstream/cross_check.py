"""Issue 11 (c): adapter files cross between the patched PEFT (its own fields) and stock PEFT + peft_buffers.

    python tests/upstream/cross_check.py write native|peft_buffers DIR   # train the scenarios, save them + outputs
    python tests/upstream/cross_check.py read  native|peft_buffers DIR   # load DIR's files, compare bitwise

``native`` needs a PEFT with ``save_running_stats`` / ``parameters_to_save`` (patches/peft-v0.22.0) and runs with
peft_buffers disabled; ``peft_buffers`` needs a PEFT without them and enables peft_buffers. ``nox -s upstream`` writes
with each and reads with the other. Exit status 1 when any output differs. Scenarios: BatchNorm ResNet, ViT with
trained position embeddings and cls token, two adapters with their own statistics (set_adapter, disable_adapter).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: peft_buffers, tests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "read"])
    parser.add_argument("mode", choices=["native", "peft_buffers"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)

    import torch

    from peft_buffers.binding import peft_has_native_fields
    from tests.upstream import _scenarios as sc

    torch.set_num_threads(1)
    if peft_has_native_fields() != (args.mode == "native"):
        have = "has" if peft_has_native_fields() else "lacks"
        sys.exit(f"mode {args.mode!r} does not fit this PEFT: it {have} save_running_stats / parameters_to_save")
    sc.set_mode(args.mode)
    if args.action == "write":
        args.directory.mkdir(parents=True, exist_ok=True)
        expected = sc.write(args.mode, args.directory)
        print(f"cross_check: wrote {len(expected)} expected outputs and their adapters with {args.mode} to "
              f"{args.directory}")
        return 0
    expected = torch.load(args.directory / "expected.pt")
    outputs = sc.reload_outputs(args.mode, args.directory)
    problems = sc.mismatches(expected, outputs)
    differing = {problem.split(":")[0] for problem in problems}
    for key in outputs:
        print(f"cross_check: read with {args.mode}: {key}: {'DIFFERS' if key in differing else 'bitwise equal'}")
    for problem in problems:
        print(f"cross_check: DIFFERS {problem}")
    print(f"cross_check: {len(outputs) - len(problems)} of {len(outputs)} outputs bitwise equal after reading "
          f"{args.directory} with {args.mode}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
