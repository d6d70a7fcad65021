"""Attach time: what ``peft_buffers.enable()`` adds to building a PEFT model (issue 9, "Cost").

Two entry points, each timed with peft_buffers disabled (stock) and enabled, interleaved like the saves and
loads: ``get_peft_model`` on a fresh copy of the base, and ``PeftModel.from_pretrained`` of the *stock* file of
the same trained model (so both variants read the same bytes and load the same tensors: the difference is what
attaching costs, whatever peft_buffers does at attach, e.g. capturing base values).
"""

from __future__ import annotations

import copy
import statistics
from typing import Callable

import torch
from torch import nn

from .env import Timer, summarize

__all__ = ["VARIANTS", "time_attach"]

VARIANTS = ("stock", "peft_buffers")


def time_attach(
    pristine: nn.Module, make_config: Callable[[nn.Module], object], stock_dir: str, device: torch.device,
    reps: int, warmup: int, set_peft_buffers: Callable[[bool], None],
) -> dict:
    """Median/min/max of get_peft_model and from_pretrained, stock vs peft_buffers, and their paired difference.

    ``pristine`` is the base on the device; a copy is made outside the timed region for every call.
    """
    from peft import PeftModel, get_peft_model

    timer = Timer(device)
    calls = {
        "get_peft_model": lambda base: get_peft_model(base, make_config(base)),
        "from_pretrained": lambda base: PeftModel.from_pretrained(base, stock_dir),
    }
    runs: dict = {call: {v: [] for v in VARIANTS} for call in calls}
    with timer.session():  # one session: its full collections cost more than a tiny model's calls
        for call, fn in calls.items():
            for rep in range(warmup + reps):
                order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]  # alternate who goes first
                for variant in order:
                    set_peft_buffers(variant == "peft_buffers")
                    base = copy.deepcopy(pristine)
                    ms, model = timer(fn, base)
                    if rep >= warmup:
                        runs[call][variant].append(ms)
                    del model, base
    set_peft_buffers(False)
    result = {}
    for call, by_variant in runs.items():
        paired = [p - s for p, s in zip(by_variant["peft_buffers"], by_variant["stock"])]
        result[call] = {
            **{v: summarize(r) for v, r in by_variant.items()},
            "overhead_ms": {
                "median_difference": statistics.median(by_variant["peft_buffers"]) -
                statistics.median(by_variant["stock"]),
                "paired_median": statistics.median(paired),
            },
        }
    return result
