"""What an atomic save costs, and what refusing a file of 100,000 unknown keys costs, next to stock PEFT.

    PYTHONPATH=. python -m benchmarks.save_cost                      # both parts, files on disk and in /dev/shm
    PYTHONPATH=. python -m benchmarks.save_cost --reps 5 --keys 10000 # quicker

1. ``save_pretrained`` of the same model, stock PEFT vs ``peft_buffers.enable()`` (staging folder, fsync of
   every file, the in-progress record, moves into place, fsync of the folder), into a folder that already holds
   the previous save (the case the atomic save protects). Wall-clock (fsync is waiting, not CPU), median of
   ``--reps`` interleaved repetitions after one warm-up each, garbage collector off during the call. Models: a
   small LoRA + BatchNorm net (a file of a few KB) and 32 ``Linear(1024, 1024)`` with LoRA r=64 (16 MiB).
2. ``PeftModel.from_pretrained`` of a file holding ``--keys`` unknown keys (one-element tensors) besides a valid
   adapter: stock PEFT loads it (drops them silently); peft_buffers refuses it by name
   (``IncompatibleExtraState``). Median of ``--refusal-reps`` each; the length of the refusal's message.

The machine's 1-minute load average is printed before and after: on a shared machine, compare only figures
of one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_buffers


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(32)])


MODELS = {
    "small LoRA + BatchNorm": (_small, LoraConfig(target_modules=["0"], init_lora_weights=False)),
    "32 x Linear(1024) LoRA r=64": (_wide, LoraConfig(target_modules=[str(i) for i in range(32)], r=64,
                                                      init_lora_weights=False)),
}


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def _timed(fn, *args) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start
    finally:
        gc.enable()


def save_costs(root: Path, reps: int) -> list[dict]:
    rows = []
    for name, (make, config) in MODELS.items():
        model = get_peft_model(make(), config)  # attached while disabled: both strategies save the same keys
        model(torch.randn(4, 8 if make is _small else 1024)).sum().backward()
        folder = Path(tempfile.mkdtemp(dir=root))
        times: dict[str, list[float]] = {"stock": [], "peft_buffers": []}
        for rep in range(reps + 1):
            order = ["stock", "peft_buffers"] if rep % 2 else ["peft_buffers", "stock"]
            for strategy in order:
                if strategy == "stock":
                    peft_buffers.disable()
                else:
                    peft_buffers.enable()
                seconds = _timed(model.save_pretrained, folder)
                if rep:  # the first is a warm-up
                    times[strategy].append(seconds)
        peft_buffers.disable()
        size = (folder / "adapter_model.safetensors").stat().st_size
        shutil.rmtree(folder)
        stock, ours = statistics.median(times["stock"]), statistics.median(times["peft_buffers"])
        rows.append({"model": name, "file": f"{size / 2**20:.2f} MiB" if size > 2**20 else f"{size / 1e3:.1f} KB",
                     "stock ms": f"{1e3 * stock:.1f}", "atomic ms": f"{1e3 * ours:.1f}",
                     "added ms": f"{1e3 * (ours - stock):+.1f}"})
    return rows


def refusal_cost(root: Path, keys: int, reps: int) -> dict:
    folder = Path(tempfile.mkdtemp(dir=root))
    peft_buffers.disable()
    get_peft_model(_small(), LoraConfig(target_modules=["0"])).save_pretrained(folder)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.update({f"base_model.model.unknown_{i}.running_mean": torch.zeros(1) for i in range(keys)})
    save_file(tensors, path)

    def stock_load():
        PeftModel.from_pretrained(_small(), folder)

    message = []

    def refused_load():
        try:
            PeftModel.from_pretrained(_small(), folder)
        except peft_buffers.IncompatibleExtraState as error:
            message.append(str(error))
        else:
            raise AssertionError("the file was not refused")

    stock, ours = [], []
    for _ in range(reps):
        peft_buffers.disable()
        stock.append(_timed(stock_load))
        peft_buffers.enable()
        ours.append(_timed(refused_load))
    peft_buffers.disable()
    stock_s, ours_s = statistics.median(stock), statistics.median(ours)
    result = {"keys": f"{keys:,}", "file": f"{path.stat().st_size / 1e6:.1f} MB", "stock load s": f"{stock_s:.2f}",
              "peft_buffers refusal s": f"{ours_s:.2f}", "ratio": f"{ours_s / stock_s:.2f}",
              "message chars": f"{len(message[-1]):,}"}
    shutil.rmtree(folder)
    return result


def _table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--refusal-reps", type=int, default=3)
    parser.add_argument("--dirs", nargs="*", default=[tempfile.gettempdir(), "/dev/shm"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}, peft "
          f"{__import__('peft').__version__}, load {_load()} at start")
    for directory in args.dirs:
        if not os.path.isdir(directory):
            continue
        print(f"\n## save_pretrained into {directory} (median of {args.reps}, ms)\n")
        print(_table(save_costs(Path(directory), args.reps)))
    print(f"\n## refusing {args.keys:,} unknown keys (median of {args.refusal_reps})\n")
    print(_table([refusal_cost(Path(tempfile.gettempdir()), args.keys, args.refusal_reps)]))
    print(f"\nload {_load()} at end")


if __name__ == "__main__":
    main()
