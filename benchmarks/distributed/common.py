"""What every rank of the distributed runs shares: the model, the data, the reference runs, save/load checks.

The model is a random-init transformers ResNet (``--model resnet50``: ResNetConfig's defaults, ResNet-50's
bottleneck 3-4-6-3 with 53 BatchNorm2d layers; ``--model tiny``: two stages of width 8/16 for CPU runs) with
LoRA on every convolution and the stem BatchNorm's affine weight unfrozen (a trained direct parameter).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

STEPS = 3
LR = 0.05
STEM = "base_model.model.resnet.embedder.embedder.normalization"
STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
# Global-batch statistics (SyncBatchNorm over N ranks vs one process on the N batches concatenated) agree to
# float32 rounding, not bitwise: the reductions run in another order. The stated tolerance:
RTOL, ATOL = 1e-4, 1e-5
SIZES = {"resnet50": {"image": 64, "batch": 8}, "tiny": {"image": 16, "batch": 4}}


def resnet(model: str, seed: int = 0) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    if model == "resnet50":
        config = ResNetConfig(num_labels=10)
    else:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(seed)
    return ResNetForImageClassification(config)


def peft_resnet(model: str, sync_bn: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=["convolution"], r=4, init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(resnet(model), config)
    peft_model.get_submodule(STEM).weight.requires_grad_(True)  # a trained direct parameter
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(peft_model) if sync_bn else peft_model


def batch(model: str, rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s images at ``step``: different data on every rank, reproducible in one process."""
    size = SIZES[model]
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(size["batch"], 3, size["image"], size["image"], generator=generator)


def eval_images(model: str) -> torch.Tensor:
    size = SIZES[model]["image"]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(999))


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits.square().mean()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


def train(model: nn.Module, optimizer, rank: int, device, backward: Callable, name: str) -> None:
    model.train()
    for step in range(STEPS):
        backward(loss_of(model, batch(name, rank, step).to(device)))
        optimizer.step()
        optimizer.zero_grad()


def deterministic(device_type: str) -> None:
    """Exact kernels: fp32 convolutions without TF32, deterministic cuDNN (bitwise reloads, tight references)."""
    if device_type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def norm_stats(state: dict) -> dict:
    """The running-statistic entries of a state dict (or of an adapter file), by their full key."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in STAT_NAMES}


def compare_stats(saved: dict, reference: dict) -> dict:
    """Max |Δ| and max |Δ| relative to each tensor's scale between the file's statistics and a reference run's,
    and whether every tensor is within the stated tolerance."""
    worst_abs = worst_rel = 0.0
    close = set(saved) == set(reference)
    for key in set(saved) & set(reference):
        a, b = saved[key].double().cpu(), reference[key].double().cpu()
        diff = (a - b).abs()
        worst_abs = max(worst_abs, diff.max().item())
        # Relative to the tensor's scale (max |reference|): an entry near zero does not inflate it.
        worst_rel = max(worst_rel, diff.max().item() / max(b.abs().max().item(), 1e-12))
        if key.endswith("num_batches_tracked"):
            close &= torch.equal(a, b)
        else:
            close &= torch.allclose(a, b, rtol=RTOL, atol=ATOL)
    return {"keys": len(saved), "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "tolerance": f"rtol={RTOL:g}, atol={ATOL:g} (num_batches_tracked exact)", "within_tolerance": close}


def reference_global_batch(name: str, world: int, device) -> dict:
    """One process, plain BatchNorm, each step on all ranks' batches concatenated: SyncBatchNorm's target.

    The per-rank loss is a mean over the rank's batch and DDP averages gradients, so the global loss is the
    mean over the concatenated batch: the same training, in one process.
    """
    model = peft_resnet(name).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(STEPS):
        x = torch.cat([batch(name, r, step) for r in range(world)]).to(device)
        loss_of(model, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in norm_stats(model.state_dict()).items()}


def reference_ddp_plain_bn(name: str, world: int, device) -> dict:
    """One process emulating DDP with plain BatchNorm and ``broadcast_buffers=True``: every rank normalises
    with its own batch's statistics and starts each forward from rank 0's buffers; the gradient is the mean
    over ranks. What rank 0 ends with is what DDP's rank 0 (and its gathered state dict) should hold."""
    model = peft_resnet(name).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    buffers = dict(model.named_buffers())
    model.train()
    for step in range(STEPS):
        start = {k: v.clone() for k, v in buffers.items()}
        rank0_after = None
        for rank in reversed(range(world)):  # rank 0 last: its buffer updates are the ones that stay
            with torch.no_grad():
                for k, v in buffers.items():
                    v.copy_(start[k])
            (loss_of(model, batch(name, rank, step).to(device)) / world).backward()
            if rank == 0:
                rank0_after = {k: v.clone() for k, v in buffers.items()}
        with torch.no_grad():
            for k, v in buffers.items():
                v.copy_(rank0_after[k])
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in norm_stats(model.state_dict()).items()}


def timed(fn: Callable, device) -> tuple:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3, result


def _summary(runs: list) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "n": len(runs),
            "runs": [round(r, 3) for r in runs]}


def save_and_check(model: nn.Module, full_state_dict: dict, name: str, device, out: Path, reps: int,
                   live: Optional[torch.Tensor], info: dict) -> dict:
    """Rank 0: save with the gathered state dict, with and without peft_buffers; reload on one device; time it.

    ``live`` is rank 0's trained model's eval-mode logits on :func:`eval_images` (``None`` where the live model
    cannot be run alone, e.g. sharded): the reload must equal it bitwise. Every run also compares against a
    plain copy of the model loaded from the gathered state dict.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    import peft_buffers

    dirs = {"peft_buffers": out / "adapter", "stock": out / "stock"}
    saves: dict = {v: [] for v in dirs}
    loads: dict = {v: [] for v in dirs}
    x = eval_images(name).to(device)
    reloaded = {}
    pristine = resnet(name)  # built once on the CPU (same seed, same weights as training's); copied per load
    for rep in range(1 + reps):  # one warm-up, then interleaved: stock and peft_buffers alike
        for variant in (("stock", "peft_buffers") if rep % 2 else ("peft_buffers", "stock")):
            (peft_buffers.enable if variant == "peft_buffers" else peft_buffers.disable)()
            path = dirs[variant]
            ms, _ = timed(lambda path=path: model.save_pretrained(path, state_dict=full_state_dict), device)
            base = copy.deepcopy(pristine).to(device)
            load_ms, loaded = timed(lambda path=path, base=base: PeftModel.from_pretrained(base, path), device)
            if rep:
                saves[variant].append(ms)
                loads[variant].append(load_ms)
            else:
                reloaded[variant] = logits(loaded, x)
    peft_buffers.enable()

    reference = peft_resnet(name)
    reference.load_state_dict({k: v.cpu() for k, v in full_state_dict.items()})
    expected = logits(reference.to(device), x)
    saved = load_file(str(dirs["peft_buffers"] / "adapter_model.safetensors"))
    info.update(
        saved_stat_keys=sum(k.endswith("running_mean") for k in saved),
        base_stat_modules=sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reference.modules()),
        saved_direct_parameter=f"{STEM}.weight" in saved,
        reload_equals_gathered_state=torch.equal(reloaded["peft_buffers"], expected),
        reload_equals_rank0_live=None if live is None else torch.equal(reloaded["peft_buffers"], live),
        stock_reload_equals_rank0=torch.equal(reloaded["stock"], expected),
        timings_ms={"save_pretrained": {v: _summary(r) for v, r in saves.items()},
                    "from_pretrained": {v: _summary(r) for v, r in loads.items()}},
    )
    return saved


def write(out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(info, indent=1, default=str))
    print("RESULT " + json.dumps({k: v for k, v in info.items() if k != "timings_ms"}, default=str), flush=True)


def gather_rows(tensor: torch.Tensor, world: int) -> list:
    """Every rank's copy of ``tensor``, on the CPU (world size 1 without a process group: just this one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [tensor.cpu()]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return [p.cpu() for p in parts]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def env_world() -> tuple:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
