"""Cost of PEFT's own fields (patches/peft-v0.22.0) next to stock PEFT and peft_buffers: file bytes, save, load.

    PYTHONPATH=. python -m benchmarks.upstream [--quick] [--device cpu|cuda] [--reps N] [--models resnet50,...]

Needs the patched PEFT importable for the ``native`` row (``nox -s upstream`` builds one; or put an unpacked, patched
sdist's ``src`` on PYTHONPATH); without it the row is left out and said so. Per model: one training step in train
mode (norm statistics move; ViT trains its position embeddings and cls token in every row, unfrozen by hand for
stock PEFT and peft_buffers, through ``parameters_to_save`` for native), then, interleaved over ``--reps``
repetitions, ``save_pretrained`` and ``PeftModel.from_pretrained`` onto a fresh copy of the base already on the
device. Prints the median times, the adapter file's bytes, and max |Δ logits| of the reloaded model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

import peft_buffers
from benchmarks.models import MODELS, logits_of, loss_of
from peft_buffers.binding import peft_has_native_fields

STRATEGIES = ("stock", "native", "peft_buffers")
ADAPTER_FILE = "adapter_model.safetensors"


def _config(spec, base, strategy: str):
    from peft import LoraConfig

    kwargs = {"r": spec.lora_r, "lora_alpha": spec.lora_r, "target_modules": spec.lora_targets(base)}
    if strategy == "native":
        kwargs["save_running_stats"] = True
        if spec.direct_params:
            kwargs["parameters_to_save"] = list(spec.direct_params)
    return LoraConfig(**kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_model(spec, strategies, device: torch.device, quick: bool, reps: int, scratch: str) -> list[dict]:
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = spec.build(quick).eval()
    generator = torch.Generator().manual_seed(0)
    train_batch = {k: v.to(device) for k, v in spec.make_batch(quick, generator, train=False).items()}
    eval_batch = {k: v.to(device) for k, v in spec.make_batch(quick, generator, train=False).items()}
    trained, expected = {}, {}
    for strategy in strategies:
        peft_buffers.enable() if strategy == "peft_buffers" else peft_buffers.disable()
        model = get_peft_model(copy.deepcopy(base), _config(spec, base, strategy)).to(device)
        if strategy != "native":  # the user unfreezes them by hand (#2099); native: parameters_to_save does it
            for module in model.get_base_model().modules():
                for name in spec.direct_params:
                    if module._parameters.get(name) is not None:
                        module._parameters[name].requires_grad_(True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        loss_of(spec, model, train_batch).backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            expected[strategy] = logits_of(spec, model, eval_batch).float()
        trained[strategy] = model
    times = {s: {"save": [], "load": []} for s in strategies}
    rows = {}
    for rep in range(reps):
        for strategy in strategies[rep % len(strategies):] + strategies[: rep % len(strategies)]:
            peft_buffers.enable() if strategy == "peft_buffers" else peft_buffers.disable()
            path = os.path.join(scratch, f"{spec.name}-{strategy}-{rep}")
            _sync(device)
            start = time.perf_counter()
            trained[strategy].save_pretrained(path)
            _sync(device)
            times[strategy]["save"].append(time.perf_counter() - start)
            fresh = copy.deepcopy(base).to(device)
            _sync(device)
            start = time.perf_counter()
            loaded = PeftModel.from_pretrained(fresh, path)
            _sync(device)
            times[strategy]["load"].append(time.perf_counter() - start)
            if rep == 0:
                with torch.no_grad():
                    delta = (logits_of(spec, loaded.eval(), eval_batch).float() - expected[strategy]).abs().max()
                rows[strategy] = {"bytes": os.path.getsize(os.path.join(path, ADAPTER_FILE)), "delta": delta.item()}
            del loaded, fresh
    peft_buffers.disable()
    return [{"model": spec.label, "strategy": s, **rows[s], "save_ms": 1e3 * statistics.median(times[s]["save"]),
             "load_ms": 1e3 * statistics.median(times[s]["load"])} for s in strategies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b16_384")
    args = parser.parse_args()
    device = torch.device(args.device)
    strategies = STRATEGIES if peft_has_native_fields() else tuple(s for s in STRATEGIES if s != "native")
    if "native" not in strategies:
        print("this PEFT lacks save_running_stats / parameters_to_save: the 'native' row is left out")
    import peft

    print(f"torch {torch.__version__}, peft {peft.__version__} ({peft.__file__}), device {device}, reps {args.reps}, "
          f"threads {torch.get_num_threads()}, quick {args.quick}")
    print("| model | strategy | file bytes | over stock | save ms | load ms | max \\|Δ logits\\| |")
    print("|---|---|---:|---:|---:|---:|---:|")
    wanted = args.models.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        for spec in (s for s in MODELS if s.name in wanted):
            rows = run_model(spec, strategies, device, args.quick, args.reps, scratch)
            stock_bytes = rows[0]["bytes"]
            for row in rows:
                print(f"| {row['model']} | {row['strategy']} | {row['bytes']:,} | {row['bytes'] - stock_bytes:+,} | "
                      f"{row['save_ms']:.1f} | {row['load_ms']:.1f} | {row['delta']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
