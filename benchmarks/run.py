"""The measurements: every model under every strategy, and the scaling sweep.

Strategies (toggled in one process: ``peft_buffers.enable()``/``disable()`` are cheap and idempotent):

* ``stock``: plain PEFT; running statistics and trained direct parameters are lost on reload.
* ``workaround``: plain PEFT with the documented fix, the norm layers (ViT: the module holding the position
  embeddings) in ``modules_to_save``; PEFT then trains and saves copies of them.
* ``peft_buffers``: ``peft_buffers.enable()``, then plain PEFT code.
* ``full``: a full checkpoint, ``safetensors.torch.save_model`` of the whole PEFT model.
"""

from __future__ import annotations

import copy
import hashlib
import os
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

import peft_buffers

from .attach import time_attach
from .env import Timer, summarize, sync
from .models import ModelSpec, NormStack, logits_of, loss_of

__all__ = ["STRATEGIES", "run_model", "run_scaling"]

STRATEGIES = ("stock", "workaround", "peft_buffers", "full")
ADAPTER_FILE = "adapter_model.safetensors"
FULL_FILE = "model.safetensors"
RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
TRAIN_STEPS = 3


def set_peft_buffers(on: bool) -> None:
    if on:
        peft_buffers.enable()
    else:
        peft_buffers.disable()


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _file_sha(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _rotated(items: tuple, rep: int) -> tuple:
    # Interleave strategies and rotate who goes first, so drift and cache effects hit all alike.
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def _lora_config(spec: ModelSpec, base: nn.Module, strategy: str):
    from peft import LoraConfig

    kwargs = {"r": spec.lora_r, "lora_alpha": spec.lora_r, "target_modules": spec.lora_targets(base)}
    if strategy == "workaround":
        kwargs["modules_to_save"] = spec.workaround_modules(base)
    return LoraConfig(**kwargs)


def _unfreeze_direct_params(spec: ModelSpec, model: nn.Module) -> None:
    for module in model.get_base_model().modules():
        for name in spec.direct_params:
            param = module._parameters.get(name)
            if param is not None:
                param.requires_grad_(True)


def _train(spec: ModelSpec, model: nn.Module, batches: list, device: torch.device) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for batch in batches:
        loss = loss_of(spec, model, _to(batch, device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _save(strategy: str, model: nn.Module, path: str) -> None:
    if strategy == "full":
        from safetensors.torch import save_model

        os.makedirs(path, exist_ok=True)
        save_model(model, os.path.join(path, FULL_FILE), force_contiguous=True)
    else:
        model.save_pretrained(path)


def _load(spec: ModelSpec, strategy: str, base: nn.Module, path: str, device: torch.device) -> nn.Module:
    from peft import PeftModel, get_peft_model

    if strategy == "full":
        from safetensors.torch import load_model

        model = get_peft_model(base, _lora_config(spec, base, strategy))
        load_model(model, os.path.join(path, FULL_FILE), strict=True, device=str(device))
        return model
    return PeftModel.from_pretrained(base, path)


def _weights_file(strategy: str, path: str) -> str:
    return os.path.join(path, FULL_FILE if strategy == "full" else ADAPTER_FILE)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_model(
    spec: ModelSpec, quick: bool, device: torch.device, reps: int, warmup: int, scratch: str,
    strategies: tuple = STRATEGIES,
) -> dict:
    """Train one model under every strategy, then time saves and loads interleaved; return the record."""
    from peft import get_peft_model

    timer = Timer(device)
    started = time.perf_counter()
    _log(f"{spec.label}: building")
    torch.manual_seed(0)
    with torch.device(device):
        pristine = spec.build(quick)
    pristine = pristine.to(device=device, dtype=spec.dtype).eval()
    for p in pristine.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    train_batches = [spec.make_batch(quick, generator) for _ in range(TRAIN_STEPS)]
    eval_batch = _to(spec.make_batch(quick, generator, train=False), device)
    record = {
        "name": spec.name,
        "label": spec.label + (" (tiny)" if quick else ""),
        "notes": spec.notes,
        "dtype": str(spec.dtype).replace("torch.", ""),
        "base_params": _count(pristine.parameters()),
        "lora_targets": len(spec.lora_targets(pristine)),
        "lora_r": spec.lora_r,
        "workaround_modules": len(spec.workaround_modules(pristine)),
        "workaround_note": spec.workaround_note,
        "train_batch": spec.batch[quick],
        "train_steps": TRAIN_STEPS,
        "strategies": {},
    }
    if spec.kind == "image":
        record["image_size"] = spec.image_size[quick]
    else:
        record["seq_len"] = spec.seq_len[quick]

    trained: dict = {}
    reference: dict = {}
    paths = {s: os.path.join(scratch, spec.name, s) for s in strategies}
    for strategy in strategies:
        set_peft_buffers(strategy == "peft_buffers")
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        torch.manual_seed(2)  # same LoRA initialisation for every strategy
        base = copy.deepcopy(pristine)
        model = get_peft_model(base, _lora_config(spec, base, strategy))
        if strategy != "workaround":  # the workaround trains the copy inside modules_to_save instead
            _unfreeze_direct_params(spec, model)
        trainable = _count(p for p in model.parameters() if p.requires_grad)
        _train(spec, model, train_batches, device)
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else None
        with torch.no_grad():
            reference[strategy] = logits_of(spec, model, eval_batch).detach()
        trained[strategy] = model
        _save(strategy, model, paths[strategy])
        size = os.path.getsize(_weights_file(strategy, paths[strategy]))
        record["strategies"][strategy] = {
            "trainable_params": trainable,
            "peak_train_bytes": peak,
            "file_bytes": size,
        }
        _log(f"{spec.label}/{strategy}: trained, {trainable} trainable, file {size} B")

    _extra_state_accounting(spec, record, trained, paths, scratch)
    if "stock" in strategies:
        stock_trainable = record["strategies"]["stock"]["trainable_params"]
        for entry in record["strategies"].values():
            entry["added_trainable_params"] = entry["trainable_params"] - stock_trainable

    # Saves, interleaved.
    save_runs: dict = {s: [] for s in strategies}
    with timer.session():
        for rep in range(warmup + reps):
            for strategy in _rotated(strategies, rep):
                set_peft_buffers(strategy == "peft_buffers")
                target = os.path.join(scratch, spec.name, f"timed-save-{strategy}")
                ms, _ = timer(_save, strategy, trained[strategy], target)
                if rep >= warmup:
                    save_runs[strategy].append(ms)
    _log(f"{spec.label}: saves timed")

    # Loads onto a fresh copy of the base already on the device, interleaved.
    load_runs: dict = {s: [] for s in strategies}
    with timer.session():
        for rep in range(warmup + reps):
            for strategy in _rotated(strategies, rep):
                set_peft_buffers(strategy == "peft_buffers")
                base = copy.deepcopy(pristine)
                ms, loaded = timer(_load, spec, strategy, base, paths[strategy], device)
                if rep >= warmup:
                    load_runs[strategy].append(ms)
                if rep == 0:
                    with torch.no_grad():
                        loaded.eval()
                        diff = _max_abs_diff(logits_of(spec, loaded, eval_batch), reference[strategy])
                    record["strategies"][strategy]["max_abs_dlogits"] = diff
                del loaded, base
    _log(f"{spec.label}: loads timed")

    if "stock" in strategies and "peft_buffers" in strategies:
        # The quick (CI smoke) run times attach once, without warm-up: it only has to work.
        record["attach"] = time_attach(pristine, lambda base: _lora_config(spec, base, "stock"), paths["stock"],
                                       device, 1 if quick else reps, 0 if quick else warmup,
                                       set_peft_buffers)
        _log(f"{spec.label}: attach timed")

    for strategy in strategies:
        entry = record["strategies"][strategy]
        entry["save_ms"] = summarize(save_runs[strategy])
        entry["load_ms"] = summarize(load_runs[strategy])
    set_peft_buffers(False)
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    del trained, reference, pristine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def _extra_state_accounting(spec: ModelSpec, record: dict, trained: dict, paths: dict, scratch: str) -> None:
    """Extra bytes, the floor (stock + exactly the extra tensors) and byte-identity with a stock save."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    strategies = record["strategies"]
    if "peft_buffers" not in trained:
        return
    model = trained["peft_buffers"]
    extra = peft_buffers.extra_state_dict(model)
    stats = {k: v for k, v in extra.items() if k.rsplit(".", 1)[-1] in RUNNING_STAT_NAMES}
    parameter_names = {name for name, _ in model.named_parameters()}
    direct = {k: v for k, v in extra.items() if k not in stats and k in parameter_names}
    buffers = {k: v for k, v in extra.items() if k not in stats and k not in direct}
    extra_bytes = sum(v.numel() * v.element_size() for v in extra.values())

    # The same trained model saved by stock PEFT: what peft_buffers adds is exactly the difference.
    set_peft_buffers(False)
    as_stock = os.path.join(scratch, spec.name, "peft_buffers-model-saved-by-stock")
    model.save_pretrained(as_stock)
    stock_same_model = os.path.getsize(os.path.join(as_stock, ADAPTER_FILE))
    standalone = os.path.join(scratch, spec.name, "extra-only.safetensors")
    save_file({k: v.detach().contiguous() for k, v in extra.items()}, standalone)
    # The floor: the file stock PEFT would write if it carried exactly these tensors under the same keys (its
    # own tensors, the extra ones and their header entries, PEFT's metadata): nothing else is unavoidable.
    with safe_open(os.path.join(as_stock, ADAPTER_FILE), framework="pt") as handle:
        metadata, stock_tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    floor_path = os.path.join(scratch, spec.name, "floor.safetensors")
    save_file({**stock_tensors, **{k: v.detach().cpu().contiguous() for k, v in extra.items()}}, floor_path,
              metadata=metadata)
    floor = os.path.getsize(floor_path)
    ours = _weights_file("peft_buffers", paths["peft_buffers"])
    record["extra_state"] = {
        "tensors": len(extra),
        "running_stat_tensors": len(stats),
        "direct_param_tensors": len(direct),
        "direct_params": sorted(direct),
        "other_buffer_tensors": len(buffers),  # changed buffers that are not running statistics (issue 9)
        "tensor_bytes": extra_bytes,
        "standalone_safetensors_bytes": os.path.getsize(standalone),
        "stock_save_of_same_model_bytes": stock_same_model,
        "floor_bytes": floor,
        "identical_to_stock_save": _file_sha(ours) == _file_sha(os.path.join(as_stock, ADAPTER_FILE)),
    }
    stock_bytes = strategies.get("stock", {}).get("file_bytes", stock_same_model)
    for entry in strategies.values():
        entry["extra_bytes_over_stock"] = entry["file_bytes"] - stock_bytes
        entry["bytes_over_floor"] = entry["file_bytes"] - floor


# --------------------------------------------------------------------------------------------- scaling


def run_scaling(sizes: list, device: torch.device, reps: int, warmup: int, scratch: str,
                progress: Optional[Callable[[dict], None]] = None) -> list:
    """Save/load time of peft_buffers vs stock on :class:`NormStack` models with ``n`` BatchNorm layers.

    ``extra_only`` times safetensors writing/reading exactly the extra tensors alone: the part of the
    overhead that any format carrying them pays, whoever gathers them.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    timer = Timer(device)
    results = []
    variants = ("stock", "peft_buffers", "extra_only")
    for n in sizes:
        reps_n = reps if n < 10_000 else (reps + 1) // 2  # the 10,000-layer point: half the repetitions
        started = time.perf_counter()
        torch.manual_seed(0)
        pristine = NormStack(n).to(device).eval()
        for p in pristine.parameters():
            p.requires_grad_(False)
        set_peft_buffers(True)
        torch.manual_seed(2)
        model = get_peft_model(copy.deepcopy(pristine), LoraConfig(r=4, target_modules=["proj"]))
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 8, device=device))
        model.eval()
        extra = {k: v.detach().contiguous() for k, v in peft_buffers.extra_state_dict(model).items()}
        root = os.path.join(scratch, f"scaling-{n}")
        paths = {v: os.path.join(root, v) for v in variants}

        def save(variant: str, path: str, model=model, extra=extra) -> None:
            if variant == "extra_only":
                os.makedirs(path, exist_ok=True)
                save_file(extra, os.path.join(path, ADAPTER_FILE))
            else:
                model.save_pretrained(path)

        for variant in variants:
            set_peft_buffers(variant == "peft_buffers")
            save(variant, paths[variant])
        sizes_b = {v: os.path.getsize(os.path.join(paths[v], ADAPTER_FILE)) for v in variants}

        save_runs: dict = {v: [] for v in variants}
        with timer.session():
            for rep in range(warmup + reps_n):
                for variant in _rotated(variants, rep):
                    set_peft_buffers(variant == "peft_buffers")
                    ms, _ = timer(save, variant, os.path.join(root, f"timed-{variant}"))
                    if rep >= warmup:
                        save_runs[variant].append(ms)

        load_runs: dict = {v: [] for v in variants}
        correct = {}
        with timer.session():
            for rep in range(warmup + reps_n):
                for variant in _rotated(variants, rep):
                    set_peft_buffers(variant == "peft_buffers")
                    if variant == "extra_only":
                        ms, _ = timer(load_file, os.path.join(paths[variant], ADAPTER_FILE), device=str(device))
                    else:
                        base = copy.deepcopy(pristine)
                        ms, loaded = timer(PeftModel.from_pretrained, base, paths[variant])
                        if rep == 0:
                            state = loaded.state_dict()
                            correct[variant] = all(torch.equal(state[k], v) for k, v in extra.items())
                            del state
                        del loaded, base
                    if rep >= warmup:
                        load_runs[variant].append(ms)
        set_peft_buffers(False)

        entry = {
            "norm_layers": n,
            "extra_tensors": len(extra),
            "file_bytes": {v: sizes_b[v] for v in variants},
            "stats_restored": correct,
            "elapsed_s": round(time.perf_counter() - started, 1),
            "save_ms": {v: summarize(save_runs[v]) for v in variants},
            "load_ms": {v: summarize(load_runs[v]) for v in variants},
        }
        for what in ("save_ms", "load_ms"):
            runs = entry[what]
            paired = [p - s for p, s in zip(runs["peft_buffers"]["runs"], runs["stock"]["runs"])]
            entry[what.replace("_ms", "_overhead_ms")] = {
                "median_difference": runs["peft_buffers"]["median"] - runs["stock"]["median"],
                "paired_median": statistics.median(paired),
                "extra_only_median": runs["extra_only"]["median"],
            }
        results.append(entry)
        _log(
            f"scaling n={n}: save overhead {entry['save_overhead_ms']['median_difference']:.2f} ms, "
            f"load overhead {entry['load_overhead_ms']['median_difference']:.2f} ms"
        )
        if progress is not None:
            progress(entry)
        del model, pristine, extra
    return results
