"""A long-lived process (a hyper-parameter search, a server) keeps nothing of the models it dropped.

Before, every model indexed its trained parameters in a module-level table that was never pruned (10-12
entries per model, forever). The test collects garbage every ``COLLECT_EVERY`` cycles (frames a library keeps
for a while can hold a model until then) and then requires every dropped model gone and every table back at its
size before the loop, exactly.
"""

from __future__ import annotations

import gc
import weakref

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from peft_buffers.core import _state, _store, _transaction

CYCLES = 300
COLLECT_EVERY = 25  # a full collection costs ~0.1-0.3 s with torch, transformers and PEFT imported


def make_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def module_level_sizes() -> dict[str, int]:
    """Every module-level table peft_buffers' core keeps (the module classes it has seen are not per model)."""
    return {"parameter index": len(_store._PARAMETER_INDEX), "optimizers checked": len(_store._checked),
            "model locks": len(_transaction._root_locks), "open transactions": len(_transaction._active),
            "transactions intercepting loads": len(_transaction._open),
            "module classes seen": sum(len(kinds) for kinds in _state._KINDS.values())}


def per_model(sizes: dict[str, int]) -> dict[str, int]:
    return {name: size for name, size in sizes.items() if name != "module classes seen"}


def test_300_train_save_load_delete_cycles_leave_no_module_level_state(enabled, tmp_path):
    # The first LoRA layer PEFT builds imports its optional backends (bitsandbytes), and a failed kernel lookup
    # there keeps its traceback, with the frames that hold that first model: build it before counting.
    get_peft_model(make_base(), LoraConfig(target_modules=["0"], r=2))
    gc.collect()
    before = per_model(module_level_sizes())  # what models of earlier tests still alive hold: they stay
    classes_seen, dropped = None, []
    for cycle in range(CYCLES):
        model = get_peft_model(make_base(), LoraConfig(target_modules=["0"], r=2))
        model.get_base_model()[2].bias.requires_grad_(True)  # a trained direct parameter: indexed
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(torch.randn(4, 4)).square().mean().backward()
        optimizer.step()
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(make_base(), tmp_path)
        if cycle % 2:
            loaded.load_adapter(tmp_path, "other")
            loaded.delete_adapter("other")
        dropped += [weakref.ref(m) for m in (model, model.get_base_model(), loaded, loaded.get_base_model())]
        del model, loaded, optimizer

        sizes = module_level_sizes()
        classes_seen = classes_seen or sizes["module classes seen"]
        assert sizes["module classes seen"] == classes_seen, f"cycle {cycle}"
        if cycle % COLLECT_EVERY == COLLECT_EVERY - 1:
            gc.collect()
            assert [ref for ref in dropped if ref() is not None] == [], f"cycle {cycle}: a model outlived a collection"
            assert per_model(module_level_sizes()) == before, f"cycle {cycle}"
            dropped.clear()
