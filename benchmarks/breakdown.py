"""Where peft_buffers' save/load overhead goes on a model with many norm layers (a developer's tool).

``python -m benchmarks.breakdown --n 10000 --device cpu`` wraps peft_buffers' internal steps with wall-clock
timers (no profiler: cProfile inflates the many small calls several-fold), runs one save and one load with
peft_buffers and with stock PEFT a few times, and prints the median time of each step. Internal names
change as the package evolves: steps that no longer exist are skipped.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["main"]

STEPS = (
    "peft_buffers.binding._save:extra_state_for_save",
    "peft_buffers.binding._peft_view:settle",
    "peft_buffers.core._state:find_base_tensors",
    "peft_buffers.core._store:ExtraStateStore.settle",
    "peft_buffers.core._store:ExtraStateStore.capture",
    "peft_buffers.binding._load:plan_load",
    "peft_buffers.binding._peft_view:model_view",
    "peft_buffers.binding._peft_view:ensure_store",
    "peft_buffers.binding._peft_view:sync",
    "peft_buffers.core._store:ExtraStateStore.set_values",
    "peft_buffers.core._store:ExtraStateStore.switch",
    "peft_buffers.binding._load:verify_adapter_path",
    "peft_buffers.core._transaction:Transaction.__init__",
    "peft.peft_model:safe_save_file",  # PEFT binds safetensors' functions by these names
    "peft.utils.save_and_load:safe_load_file",
)


def _wrap(totals: dict) -> list:
    undo = []
    for target in STEPS:
        module_name, _, attr_path = target.partition(":")
        owner = importlib.import_module(module_name)
        *parents, attr = attr_path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        original = getattr(owner, attr, None) if owner is not None else None
        if original is None:
            continue

        def timed(*args, _original=original, _target=target, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_target] = totals.get(_target, 0.0) + time.perf_counter() - start

        setattr(owner, attr, functools.wraps(original)(timed))
        undo.append((owner, attr, original))
    return undo


def main(argv=None) -> int:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    import peft_buffers

    from .models import NormStack

    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="BatchNorm1d layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    pristine = NormStack(args.n).to(device).eval().requires_grad_(False)
    peft_buffers.enable()
    model = get_peft_model(copy.deepcopy(pristine), LoraConfig(r=4, target_modules=["proj"]))
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 8, device=device))
    model.eval()
    folder = tempfile.mkdtemp(prefix="breakdown_")
    model.save_pretrained(os.path.join(folder, "pb"))
    peft_buffers.disable()
    model.save_pretrained(os.path.join(folder, "stock"))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs: dict = {}
    for rep in range(args.reps + 1):  # the first is a warm-up
        for mode in ("stock", "peft_buffers"):
            (peft_buffers.enable if mode == "peft_buffers" else peft_buffers.disable)()
            totals: dict = {}
            undo = _wrap(totals)
            try:
                sync()
                start = time.perf_counter()
                model.save_pretrained(os.path.join(folder, f"timed-{mode}"))
                sync()
                totals["TOTAL save_pretrained"] = time.perf_counter() - start
                base = copy.deepcopy(pristine)
                sync()
                start = time.perf_counter()
                PeftModel.from_pretrained(base, os.path.join(folder, "pb" if mode == "peft_buffers" else "stock"))
                sync()
                totals["TOTAL from_pretrained"] = time.perf_counter() - start
            finally:
                for owner, attr, original in reversed(undo):
                    setattr(owner, attr, original)
            if rep:
                for key, value in totals.items():
                    runs.setdefault((mode, key), []).append(value * 1e3)
    peft_buffers.disable()
    print(f"n={args.n} BatchNorm1d layers on {device}; median of {args.reps} runs, ms (steps nest: a step's time "
          "includes the steps it calls)")
    for (mode, key), values in sorted(runs.items()):
        print(f"{mode:>13}  {key:<52} {statistics.median(values):9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
