"""Minimal reproduction: accelerate's FSDP2 loading of a full state dict fails on any model with buffers.

    torchrun --nproc_per_node 2 benchmarks/distributed/accelerate_fsdp2_repro.py --out DIR    (CPU gloo or GPUs)

``accelerate launch --use_fsdp --fsdp_version 2`` defaults to ``--fsdp_cpu_ram_efficient_loading true``; then
``accelerator.prepare`` -> ``fsdp2_prepare_model`` -> ``fsdp2_load_full_state_dict``, which reads
``sharded_param.device_mesh`` for *every* entry of ``model.state_dict()``. ``fully_shard`` turns parameters
into DTensors but leaves buffers (BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``) plain
tensors, so the first buffer raises ``AttributeError: 'Tensor' object has no attribute 'device_mesh'``. No
PEFT and no peft_buffers are involved: a ``Linear`` + ``BatchNorm1d`` is enough. Workaround: launch with
``--fsdp_cpu_ram_efficient_loading false`` (``FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=False)``).
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from accelerate import __version__ as accelerate_version
    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
    from torch.distributed.fsdp import fully_shard

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(device)
    full_state_dict = model.state_dict()
    fully_shard(model)
    kinds = {k: type(v).__name__ for k, v in model.state_dict().items()}
    # The only attributes fsdp2_load_full_state_dict reads from the accelerator.
    accelerator = types.SimpleNamespace(is_main_process=rank == 0, device=device)
    try:
        fsdp2_load_full_state_dict(accelerator, model, full_state_dict)
        outcome = "loaded"
    except AttributeError as error:
        outcome = f"{type(error).__name__}: {error}"
    info = {"scenario": "accelerate_fsdp2_repro", "accelerate": accelerate_version, "torch": torch.__version__,
            "world_size": dist.get_world_size(), "device": str(device), "state_dict_entry_types": kinds,
            "fsdp2_load_full_state_dict": outcome}
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(info, indent=1))
        print("RESULT " + json.dumps(info), flush=True)
    # A failing rank 0 leaves the other ranks inside a broadcast: end without a collective.
    os._exit(0)


if __name__ == "__main__":
    main()
