"""Base identity: what recording and checking the base model an adapter was trained on costs.

Per model, on its base (the pristine model, on the device, in its dtype), interleaved:

* ``floor``: reading every base tensor's bytes once, the least any exact check pays: one ``sum`` over each
  tensor viewed as int64 words (as bytes where its size is no multiple of 8), then one synchronisation;
* ``fingerprints``: ``peft_buffers.core.fingerprints`` of the same tensors (one batch, one synchronisation);
* ``identity``: ``peft_buffers.binding.live_identity(base)``, what a load computes: the walk of the base
  model, base values, dtype, shape, quantization description and the fingerprints, nothing kept from before;
* ``identity_kept``: the same call again, with the fingerprints kept from the previous one (what a second
  ``load_adapter`` into the same model pays).

Targets (issue 20): on the GPU, ``identity`` of the 1.1B bf16 Llama ≤ 2 ms; on the CPU, ≤ 1.2 × ``floor``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .env import Timer, summarize

__all__ = ["VARIANTS", "time_identity"]

VARIANTS = ("floor", "fingerprints", "identity", "identity_kept")


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, tensors = set(), []
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor.detach())
    return tensors


def _floor(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    sums = []
    for tensor in tensors:
        flat = tensor.reshape(-1).view(torch.uint8)
        if flat.numel() % 8 == 0:
            flat = flat.view(torch.int64)
        sums.append(flat.sum())
    return sums


def time_identity(pristine: nn.Module, device: torch.device, reps: int, warmup: int) -> dict:
    """Median/min/max of each variant (ms), the bytes read, and identity / floor."""
    from peft_buffers.binding import _base_identity, live_identity
    from peft_buffers.core import fingerprints

    tensors = _unique_tensors(pristine)

    def fresh_identity():
        _base_identity._FINGERPRINTS.clear()  # noqa: SLF001 - nothing kept: what the first load pays
        return live_identity(pristine)

    calls: dict[str, Callable] = {
        "floor": lambda: _floor(tensors),
        "fingerprints": lambda: fingerprints(tensors),
        "identity": fresh_identity,
        "identity_kept": lambda: live_identity(pristine),
    }
    timer = Timer(device)
    runs: dict = {name: [] for name in VARIANTS}
    with timer.session():
        for rep in range(warmup + reps):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            for name in order:
                if name == "identity_kept":
                    live_identity(pristine)  # make sure the fingerprints are kept, whatever ran before
                ms, _ = timer(calls[name])
                if rep >= warmup:
                    runs[name].append(ms)
    result = {name: summarize(values) for name, values in runs.items()}
    result["tensors"] = len(tensors)
    result["bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    result["identity_over_floor"] = result["identity"]["median"] / result["floor"]["median"]
    result["fingerprints_over_floor"] = result["fingerprints"]["median"] / result["floor"]["median"]
    # on a shared, busy CPU the medians move by tens of percent: the fastest runs compare the work itself
    result["identity_over_floor_min"] = result["identity"]["min"] / result["floor"]["min"]
    result["torch_threads"] = torch.get_num_threads()
    return result


def main(argv=None) -> int:
    """``python -m benchmarks.identity [--device cpu|cuda] [--models llama_1b ...]``: only the base identity,
    on the full-size models, printed as JSON lines of [median, min] ms (the full run, ``python -m benchmarks``,
    includes it)."""
    import argparse
    import json
    import os

    from .models import MODELS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.identity", description=main.__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=["llama_1b"], choices=[m.name for m in MODELS])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the tiny variants")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for spec in (m for m in MODELS if m.name in args.models):
        torch.manual_seed(0)
        with torch.device(device):
            pristine = spec.build(args.quick)
        pristine = pristine.to(device=device, dtype=spec.dtype).eval()
        result = time_identity(pristine, device, args.reps, args.warmup)
        brief = {k: ([round(v["median"], 3), round(v["min"], 3)] if isinstance(v, dict) else v)
                 for k, v in result.items()}
        print(json.dumps({"model": spec.name, "device": str(device), "load_average": os.getloadavg(), **brief}),
              flush=True)
        del pristine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
