"""Minimal reproductions: accelerate 1.15's FSDP2 plugin fails in ``accelerator.prepare`` on BatchNorm models.

    torchrun --nproc_per_node 2 benchmarks/distributed/accelerate_fsdp2_repro.py --out DIR    (CPU gloo or GPUs)

No PEFT and no peft_buffers are involved. ``accelerator.prepare`` -> ``fsdp2_prepare_model`` has two faults,
called here directly with the few accelerator attributes they read (accelerate enables its FSDP plugin only
for GPU-like distributed types, so ``Accelerator`` itself cannot be used on CPU):

1. ``fsdp2_prepare_model`` calls ``getattr(model, "get_input_embeddings", lambda: None)()``; transformers 5
   models without token embeddings (``ResNetForImageClassification``) *raise* ``NotImplementedError`` there,
   which the ``getattr`` default does not catch. Any cpu_ram_efficient_loading. Workaround:
   ``model.get_input_embeddings = lambda: None`` before ``prepare``.
2. With ``--fsdp_cpu_ram_efficient_loading true`` (``accelerate launch``'s default), ``fsdp2_load_full_state_dict``
   reads ``sharded_param.device_mesh`` for *every* entry of ``model.state_dict()``; ``fully_shard`` leaves
   buffers (BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``) plain tensors:
   ``AttributeError: 'Tensor' object has no attribute 'device_mesh'`` (huggingface/accelerate#3898).
   Workaround: ``--fsdp_cpu_ram_efficient_loading false``.
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
    outcomes = {}

    def attempt(name: str, fn) -> None:
        try:
            fn()
            outcomes[name] = "ok"
        except (AttributeError, NotImplementedError) as error:
            outcomes[name] = f"{type(error).__name__}: {error}"

    # 1. The loading step alone: a Linear + BatchNorm1d.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(device)
    full_state_dict = model.state_dict()
    fully_shard(model)
    kinds = {k: type(v).__name__ for k, v in model.state_dict().items()}
    accelerator = types.SimpleNamespace(is_main_process=rank == 0, device=device)
    attempt("fsdp2_load_full_state_dict(Linear + BatchNorm1d)",
            lambda: fsdp2_load_full_state_dict(accelerator, model, full_state_dict))

    # 2. The whole prepare step on a transformers ResNet, as accelerator.prepare runs it.
    def prepare(cpu_ram_efficient_loading: bool, embeddings_workaround: bool) -> None:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        from transformers import ResNetConfig, ResNetForImageClassification

        torch.manual_seed(0)
        resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        resnet = resnet.to(device)
        if embeddings_workaround:
            resnet.get_input_embeddings = lambda: None
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=cpu_ram_efficient_loading,
                                                auto_wrap_policy="no_wrap")
        stub = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                     parallelism_config=None, mixed_precision="no", is_main_process=rank == 0,
                                     device=device)
        fsdp2_prepare_model(stub, resnet)

    for efficient in (False, True):
        for workaround in (False, True):
            label = (f"fsdp2_prepare_model(ResNet, cpu_ram_efficient_loading={efficient}"
                     f"{', get_input_embeddings -> None' if workaround else ''})")
            attempt(label, lambda efficient=efficient, workaround=workaround: prepare(efficient, workaround))
    info = {"scenario": "accelerate_fsdp2_repro", "accelerate": accelerate_version, "torch": torch.__version__,
            "world_size": dist.get_world_size(), "device": str(device), "state_dict_entry_types": kinds,
            "outcomes": outcomes}
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(info, indent=1))
        print("RESULT " + json.dumps(info), flush=True)
    # A failing rank 0 leaves the other ranks inside a broadcast: end without a collective.
    os._exit(0)


if __name__ == "__main__":
    main()
