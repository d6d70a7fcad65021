"""Train a LoRA ResNet (BatchNorm + a trained direct parameter) in several processes; rank 0 saves and reloads.

Launched the way users launch, one process per rank, different data per rank:

    accelerate launch --multi_gpu --num_processes 2 tests/integrations/distributed_train.py --out DIR
        (on a CPU machine: DDP over gloo; on GPUs add --use_fsdp --fsdp_version 1 for accelerate's FSDP;
        accelerate 1.15's FSDP2 plugin fails in accelerator.prepare on this model: it treats every state-dict
        entry as a sharded DTensor, and BatchNorm buffers are plain tensors)
    torchrun --nproc_per_node 2 tests/integrations/distributed_train.py --out DIR --fully-shard
        (torch's FSDP2 ``fully_shard``; runs on CPU with gloo)

Rank 0 saves the adapter with the full state dict the framework gathers (``accelerator.get_state_dict`` /
``get_model_state_dict(full_state_dict=True)``) through ``save_pretrained(state_dict=...)``, once with
peft_buffers and once without, reloads both into a fresh base model and writes ``result.json``: whether each
reload computes exactly as rank 0's trained model, and whose running statistics the file carries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.integrations

import peft_buffers  # noqa: E402
from tests.integrations._tiny import STEM_NORM, images, logits, lora_config, resnet  # noqa: E402

STEPS = 3
STEM = f"base_model.model.{STEM_NORM}"


def peft_resnet(sync_bn: bool):
    from peft import get_peft_model

    model = get_peft_model(resnet(0), lora_config())
    model.get_submodule(STEM).weight.requires_grad_(True)  # a trained direct parameter
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


def stem_norm(model):
    """The stem BatchNorm, found through any FSDP wrapper modules (whose names state dicts leave out)."""
    for name, module in model.named_modules():
        if name.replace("_fsdp_wrapped_module.", "") == STEM:
            return module
    raise LookupError(STEM)


def train(model, optimizer, rank: int, device, backward) -> None:
    model.train()
    for step in range(STEPS):
        out = model(images(4, seed=1000 * rank + step).to(device)).logits
        backward(out.square().mean())
        optimizer.step()
        optimizer.zero_grad()


def with_accelerate(args):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = peft_resnet(args.sync_bn)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    train(model, optimizer, accelerator.process_index, accelerator.device, accelerator.backward)
    unwrapped = accelerator.unwrap_model(model)
    stats = accelerator.gather(stem_norm(unwrapped).running_mean.detach()[None]).cpu()
    full_state_dict = accelerator.get_state_dict(model)  # every rank takes part; rank 0 gets the tensors
    live = None
    if accelerator.is_main_process and accelerator.distributed_type.name != "FSDP":
        live = logits(unwrapped, images(2, 999).to(accelerator.device))  # DDP: the live model, unsharded
    info = {"distributed_type": accelerator.distributed_type.name, "world_size": accelerator.num_processes,
            "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in unwrapped.modules())}
    if accelerator.is_main_process:
        save_and_check(unwrapped, full_state_dict, stats, live, accelerator.device, args, info)
    accelerator.wait_for_everyone()


def with_fully_shard(args):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_type, rank if device_type == "cuda" else 0) if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(device)
    model = peft_resnet(sync_bn=False).to(device)
    fully_shard(model, mesh=init_device_mesh(device_type, (world,)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    train(model, optimizer, rank, device, lambda loss: loss.backward())
    local = stem_norm(model).running_mean.detach()[None]
    stats = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(stats, local)
    full_state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    info = {"distributed_type": "FSDP2 fully_shard", "world_size": world, "sync_bn": False}
    if rank == 0:
        save_and_check(model, full_state_dict, torch.cat(stats).cpu(), None, device, args, info)
    dist.barrier()
    dist.destroy_process_group()


def save_and_check(model, full_state_dict, stats, live, device, args, info) -> None:
    """Rank 0: save with the gathered state dict (with and without peft_buffers), reload, compare."""
    from peft import PeftModel
    from safetensors.torch import load_file

    out = Path(args.out)
    model.save_pretrained(out / "adapter", state_dict=full_state_dict)
    peft_buffers.disable()
    model.save_pretrained(out / "stock", state_dict=full_state_dict)

    # Rank 0's trained model, unsharded, as a plain module: the reference.
    reference = peft_resnet(sync_bn=False)
    reference.load_state_dict({k: v.cpu() for k, v in full_state_dict.items()})
    x = images(2, 999).to(device)
    expected = logits(reference.to(device), x)
    stock = PeftModel.from_pretrained(resnet(0), out / "stock").to(device)
    peft_buffers.enable()
    ours = PeftModel.from_pretrained(resnet(0), out / "adapter").to(device)

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    info.update(
        saved_stat_keys=sum(k.endswith("running_mean") for k in saved),
        base_stat_modules=sum(1 for m in reference.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)),
        saved_direct_parameter=f"{STEM}.weight" in saved,
        reload_equals_rank0=torch.equal(logits(ours, x), expected),
        stock_reload_equals_rank0=torch.equal(logits(stock, x), expected),
        live_equals_reference=None if live is None else torch.equal(live, expected),
        saved_stats_equal_rank=[torch.equal(saved[f"{STEM}.running_mean"], s) for s in stats],
    )
    (out / "result.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fully-shard", action="store_true", help="torch FSDP2 fully_shard under torchrun")
    parser.add_argument("--sync-bn", action="store_true", help="convert BatchNorm to SyncBatchNorm (GPU only)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    peft_buffers.enable()
    (with_fully_shard if args.fully_shard else with_accelerate)(args)


if __name__ == "__main__":
    main()
