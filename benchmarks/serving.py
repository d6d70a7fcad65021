"""Serving scale: one ResNet-50-shaped model, fifty adapters each with its own statistics, loaded one after another.

A server that keeps one model and adds each requested adapter pays ``load_adapter`` per request, with more and
more adapters already in the model. Measured: each of the 50 loads (``load_adapter`` into a model that starts
with one empty adapter and holds every adapter loaded before), stock PEFT and peft_buffers on the same files,
and, with peft_buffers, ``hotswap_adapter`` of each file in turn into one adapter. Median per adapter index
over the repetitions.

The adapters are one trained adapter and 49 copies of its file with other LoRA weights and other running
statistics (seeded random values), so the fifty files differ as fifty trained ones would without training
fifty times.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from torch import nn

import peft_buffers

from .env import Timer
from .models import ModelSpec

__all__ = ["run_serving"]

ADAPTER_FILE = "adapter_model.safetensors"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _make_files(spec: ModelSpec, base: nn.Module, count: int, folder: str, device: torch.device) -> list[str]:
    """``count`` adapter folders: one trained adapter and variants of its file with other values."""
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file

    from .run import _lora_config, _train

    peft_buffers.enable()
    model = get_peft_model(copy.deepcopy(base), _lora_config(spec, base, "peft_buffers"))
    generator = torch.Generator().manual_seed(0)
    batches = [spec.make_batch(True, generator) for _ in range(2)]
    _train(spec, model, batches, device)
    first = os.path.join(folder, "adapter-00")
    model.save_pretrained(first)
    tensors = load_file(os.path.join(first, ADAPTER_FILE))
    config = open(os.path.join(first, "adapter_config.json"), "rb").read()
    paths = [first]
    for index in range(1, count):
        torch.manual_seed(index)
        varied = {}
        for key, value in tensors.items():
            if not value.is_floating_point():
                varied[key] = value.clone()
            elif key.endswith("running_var"):
                varied[key] = value * (0.5 + torch.rand_like(value))  # still a variance: positive
            else:
                varied[key] = value + 0.01 * torch.randn_like(value)
        path = os.path.join(folder, f"adapter-{index:02d}")
        os.makedirs(path, exist_ok=True)
        save_file(varied, os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
        with open(os.path.join(path, "adapter_config.json"), "wb") as f:
            f.write(config)
        paths.append(path)
    del model
    return paths


def run_serving(spec: ModelSpec, quick: bool, device: torch.device, reps: int, scratch: str,
                count: int = 50) -> dict:
    """Each of ``count`` ``load_adapter`` calls in a row, stock and peft_buffers, and peft_buffers' hotswaps."""
    from peft import PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    from .run import _lora_config

    started = time.perf_counter()
    torch.manual_seed(0)
    base = spec.build(quick).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    folder = os.path.join(scratch, "serving")
    paths = _make_files(spec, base, count, folder, device)
    timer = Timer(device)
    runs: dict = {"stock": [[] for _ in range(count)], "peft_buffers": [[] for _ in range(count)]}
    hotswaps: list = [[] for _ in range(count)]
    for rep in range(reps):
        for strategy in (("stock", "peft_buffers") if rep % 2 == 0 else ("peft_buffers", "stock")):
            peft_buffers.enable() if strategy == "peft_buffers" else peft_buffers.disable()
            # a served model starts with one empty adapter slot; every requested adapter is then loaded into it
            model = get_peft_model(copy.deepcopy(base), _lora_config(spec, base, strategy), adapter_name="slot")
            with timer.session():
                for index in range(count):
                    ms, _ = timer(model.load_adapter, paths[index], adapter_name=f"a{index:02d}")
                    runs[strategy][index].append(ms)
            del model
        peft_buffers.enable()
        model = PeftModel.from_pretrained(copy.deepcopy(base), paths[-1]).eval()
        with timer.session():
            for index in range(count):
                ms, _ = timer(hotswap_adapter, model, paths[index], adapter_name="default",
                              torch_device=str(device))
                hotswaps[index].append(ms)
        del model
    peft_buffers.disable()
    result = {
        "model": spec.label,
        "adapters": count,
        "reps": reps,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "strategies": {
            "stock": {"load_ms": [statistics.median(r) for r in runs["stock"]]},
            "peft_buffers": {"load_ms": [statistics.median(r) for r in runs["peft_buffers"]],
                             "hotswap_ms": [statistics.median(r) for r in hotswaps]},
        },
    }
    ours, stock = result["strategies"]["peft_buffers"]["load_ms"], result["strategies"]["stock"]["load_ms"]
    _log(f"serving: load_adapter #1 / #{count}: stock {stock[0]:.1f} / {stock[-1]:.1f} ms, peft_buffers "
         f"{ours[0]:.1f} / {ours[-1]:.1f} ms")
    return result
