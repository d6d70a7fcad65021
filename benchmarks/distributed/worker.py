"""One rank of a distributed run (issue 13). Launched by ``python -m benchmarks.distributed``, one of:

    accelerate launch --multi_gpu --num_processes N worker.py --scenario ddp_syncbn --out DIR   (GPUs)
    torchrun --nproc_per_node N worker.py --scenario ddp_syncbn --launcher torchrun --out DIR    (GPUs)
    ... --scenario ddp_bn          plain BatchNorm under DDP (accelerate or torchrun; CPU gloo too)
    torchrun ... --scenario fsdp2  torch's fully_shard + get_model_state_dict(full_state_dict, cpu_offload)
    accelerate launch --use_fsdp --fsdp_version 2 ... --scenario accelerate_fsdp2   (GPUs)
    accelerate launch --use_deepspeed --zero_stage 3 --zero3_save_16bit_model true ... --scenario zero3  (GPUs)

Every rank trains the same LoRA ResNet (``common.py``) 3 SGD steps on its own data; rank 0 saves with the state
dict the framework gathers through ``save_pretrained(state_dict=...)``, with and without peft_buffers, reloads
both on its own device, checks and times them, and writes ``DIR/result.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import peft_buffers  # noqa: E402
from benchmarks.distributed import common  # noqa: E402


def stem_norm(model):
    """The stem BatchNorm, found through any wrapper (DDP's ``module.``, FSDP1's wrapped-module names)."""
    for name, module in model.named_modules():
        if name.replace("_fsdp_wrapped_module.", "").removeprefix("module.") == common.STEM:
            return module
    raise LookupError(common.STEM)


def check_stats(info: dict, args, saved: dict, world: int, device) -> None:
    """The file's statistics against the single-process reference of what they should be."""
    file_stats = common.norm_stats(saved)
    if args.scenario in ("ddp_syncbn",):
        info["reference"] = "one process, plain BatchNorm, the N ranks' batches concatenated (global batch)"
        info["stats_vs_reference"] = common.compare_stats(file_stats, common.reference_global_batch(
            args.model, world, device))
    else:
        info["reference"] = "one process emulating DDP: own-batch statistics per rank, rank 0's buffers kept"
        info["stats_vs_reference"] = common.compare_stats(file_stats, common.reference_ddp_plain_bn(
            args.model, world, device))


# ------------------------------------------------------------------------------------------------ DDP


def ddp(args) -> None:
    sync_bn = args.scenario == "ddp_syncbn"
    if args.launcher == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        common.deterministic(device.type)
        model = common.peft_resnet(args.model, sync_bn).to(device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=common.LR)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        backward, kind = accelerator.backward, accelerator.distributed_type.name
        wrapper = type(wrapped).__name__
        gather = lambda: accelerator.get_state_dict(wrapped)  # noqa: E731
    else:
        from torch.nn.parallel import DistributedDataParallel

        rank, world, local = common.env_world()
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        common.deterministic(device.type)
        model = common.peft_resnet(args.model, sync_bn).to(device)
        wrapped = DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=common.LR)
        backward, kind, wrapper = (lambda loss: loss.backward()), "DDP (torchrun)", "DistributedDataParallel"
        gather = lambda: torch_full_state_dict(wrapped)  # noqa: E731
    common.train(wrapped, optimizer, rank, device, backward, args.model)
    stem = stem_norm(model)
    ranks_before = common.gather_rows(stem.running_mean.detach(), world)
    # One more forward through DDP in eval mode (no statistic moves): DDP broadcasts rank 0's buffers first.
    wrapped.eval()
    wrapped(common.eval_images(args.model).to(device))
    ranks_after = common.gather_rows(stem.running_mean.detach(), world)
    ms, full_state_dict = common.timed(gather, device)
    info = {"scenario": args.scenario, "launcher": args.launcher, "distributed_type": kind, "wrapper": wrapper,
            "world_size": world, "device": str(device), "model": args.model,
            "sync_bn_modules": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
            "gather_ms": ms}
    if rank == 0:
        live = common.logits(model, common.eval_images(args.model).to(device))
        saved = common.save_and_check(model, full_state_dict, args.model, device, Path(args.out), args.reps, live,
                                      info)
        stem_saved = saved[f"{common.STEM}.running_mean"]
        info.update(
            saved_stats_equal_rank=[torch.equal(stem_saved, r) for r in ranks_before],
            ranks_equal_after_training=all(torch.equal(ranks_before[0], r) for r in ranks_before),
            ranks_equal_after_one_more_ddp_forward=all(torch.equal(ranks_after[0], r) for r in ranks_after),
        )
        check_stats(info, args, saved, world, device)
        common.write(Path(args.out), info)
    common.barrier()


def torch_full_state_dict(wrapped) -> dict:
    """torch's gathered state dict of a DDP model, without DDP's ``module.`` prefix."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- FSDP2


def fsdp2(args) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world, local = common.env_world()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    common.deterministic(device_type)
    model = common.peft_resnet(args.model).to(device)
    fully_shard(model, mesh=init_device_mesh(device_type, (world,)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=common.LR)
    common.train(model, optimizer, rank, device, lambda loss: loss.backward(), args.model)
    ranks = common.gather_rows(stem_norm(model).running_mean.detach(), world)
    live = common.logits(model, common.eval_images(args.model).to(device))  # every rank: FSDP all-gathers
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ms, full_state_dict = common.timed(lambda: get_model_state_dict(model, options=options), device)
    info = {"scenario": "fsdp2", "launcher": "torchrun", "distributed_type": "FSDP2 fully_shard",
            "world_size": world, "device": str(device), "model": args.model, "gather_ms": ms,
            "state_dict_options": "full_state_dict=True, cpu_offload=True"}
    if rank == 0:
        saved = common.save_and_check(model, full_state_dict, args.model, device, Path(args.out), args.reps, live,
                                      info)
        info["saved_stats_equal_rank"] = [torch.equal(saved[f"{common.STEM}.running_mean"], r) for r in ranks]
        common.write(Path(args.out), info)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------- accelerate FSDP2 / ZeRO-3


def accelerate_sharded(args) -> None:
    """accelerate's FSDP2 plugin or DeepSpeed ZeRO-3, configured by ``accelerate launch`` flags."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    # The launcher's ranks (on CPU, accelerate's DeepSpeed path sees one process before DeepSpeed starts gloo).
    rank, world, _ = common.env_world()
    device = accelerator.device
    common.deterministic(device.type)
    info = {"scenario": args.scenario, "launcher": "accelerate", "distributed_type":
            accelerator.distributed_type.name, "world_size": world, "device": str(device), "model": args.model,
            "accelerate_num_processes": accelerator.num_processes,
            "cpu_ram_efficient_loading": os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")}
    model = common.peft_resnet(args.model)
    if args.embeddings_workaround:
        # accelerate's fsdp2_prepare_model calls get_input_embeddings(), which a transformers ResNet raises from.
        model.get_input_embeddings = lambda: None
        info["workaround"] = "model.get_input_embeddings = lambda: None"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=common.LR)
    if accelerator.state.deepspeed_plugin is not None:
        import deepspeed

        size = common.SIZES[args.model]["batch"]
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config.update(train_micro_batch_size_per_gpu=size, train_batch_size=size * world)
        info["deepspeed"] = deepspeed.__version__
    try:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    except Exception as error:  # the FSDP2 plugin failure the README mentions: record it, don't hide it
        info.update(prepare_failed=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
        if rank == 0:
            common.write(Path(args.out), info)
        return
    common.train(wrapped, optimizer, rank, device, accelerator.backward, args.model)
    unwrapped = accelerator.unwrap_model(wrapped)
    ranks = common.gather_rows(stem_norm(unwrapped).running_mean.detach(), world)
    live = common.logits(wrapped, common.eval_images(args.model).to(device))  # every rank takes part
    ms, full_state_dict = common.timed(lambda: accelerator.get_state_dict(wrapped), device)
    info["gather_ms"] = ms
    if rank == 0:
        saved = common.save_and_check(unwrapped, full_state_dict, args.model, device, Path(args.out), args.reps,
                                      live, info)
        info["saved_stats_equal_rank"] = [torch.equal(saved[f"{common.STEM}.running_mean"].cpu(), r) for r in ranks]
        common.write(Path(args.out), info)
    common.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True,
                        choices=("ddp_syncbn", "ddp_bn", "fsdp2", "accelerate_fsdp2", "zero3"))
    parser.add_argument("--launcher", choices=("accelerate", "torchrun"), default="accelerate")
    parser.add_argument("--model", choices=tuple(common.SIZES), default="tiny")
    parser.add_argument("--reps", type=int, default=5, help="timed save/load repetitions on rank 0")
    parser.add_argument("--embeddings-workaround", action="store_true",
                        help="make get_input_embeddings() return None (see accelerate_fsdp2_repro.py)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    peft_buffers.enable()
    if args.scenario in ("ddp_syncbn", "ddp_bn"):
        ddp(args)
    elif args.scenario == "fsdp2":
        fsdp2(args)
    else:
        accelerate_sharded(args)


if __name__ == "__main__":
    main()
