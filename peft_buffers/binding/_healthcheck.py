"""peft_buffers' findings in PEFT's ``PeftModel.healthcheck()`` report (PEFT 0.22 and later).

PEFT's healthcheck is where its users look before training. With :func:`peft_buffers.enable` on, the report
also says which base-model state training will move and the adapter file will carry, and what no adapter file
will carry. Everything added is JSON-serializable, as PEFT's report is; ``print_healthcheck`` shows the findings.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .._text import first_names, plural
from ..core import BASE, find_base_tensors, is_running_stat
from . import _peft_view as pv

__all__ = ["extra_state_report"]

def _finding(code: str, severity: str, message: str) -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}


def extra_state_report(root: nn.Module, peft_saved_keys: Callable) -> dict[str, Any]:
    """What training will move outside the adapter, what each adapter's file carries, what no file carries.

    Returns ``{"peft_buffers": section, "findings": [...]}``: the section lists names (base-model state-dict
    names, without PEFT's prefix); findings use PEFT's format (``code``, ``severity``, ``message``).

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> net = get_peft_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), LoraConfig(target_modules=["0"]))
        >>> report = extra_state_report(net, lambda root, name, candidates=None: set())
        >>> report["peft_buffers"]["running_statistics_in_train_mode"]
        ['1']
    """
    store = pv.attached_store(root)
    view = store.view if store is not None else pv.model_view(root)
    found = find_base_tensors(view)
    prefix = view.base_prefix
    adapter = pv.active_adapter(root)

    def short(key: str) -> str:
        return key[len(prefix):] if key.startswith(prefix) else key

    moving = sorted({short(p.key.rsplit(".", 1)[0]) for p in found.buffers.values()
                     if is_running_stat(p) and p.module.training})
    trainable = {p.live_key: p for p in found.parameters.values() if p.tensor.requires_grad}
    peft_own = set()
    if trainable and adapter is not None:  # e.g. an embedding layer PEFT saves itself
        peft_own = peft_saved_keys(root, adapter, {key: p.tensor for key, p in trainable.items()})
    trainable_base = sorted(short(p.key) for key, p in trainable.items() if key not in peft_own)
    carried = {} if store is None else {
        name: sorted(short(k) for k in store.owned_keys(name)) for name in store.owned if name is not BASE
    }
    unsaved = [] if store is None else sorted(short(k) for k in store.unattributed)
    section = {
        "enabled": True,
        "attached": store is not None and not getattr(store, "late", False),
        "live_adapter": None if store is None else store.live,
        "running_statistics_in_train_mode": moving,
        "trainable_base_parameters": trainable_base,
        "carried_per_adapter": carried,
        "changed_while_no_adapter_was_active": unsaved,
    }
    findings = []
    target = f"adapter {adapter!r}" if adapter is not None else "the active adapter"
    if store is None or getattr(store, "late", False):
        findings.append(_finding(
            "PEFT_BUFFERS_NOT_ATTACHED", "warning",
            "peft_buffers was enabled after this model was created, so the base model's values are unknown: "
            "call peft_buffers.enable() before get_peft_model / from_pretrained for exact adapter files."))
    if moving:
        findings.append(_finding(
            "PEFT_BUFFERS_RUNNING_STATS_MOVE", "info",
            f"{plural(len(moving), 'layer')} with running statistics in train mode ({first_names(moving)}): training "
            f"moves their statistics, and peft_buffers saves them with {target}. Call .eval() on a layer to keep "
            f"its statistics fixed."))
    if trainable_base:
        findings.append(_finding(
            "PEFT_BUFFERS_TRAINABLE_BASE_PARAMETERS", "info",
            f"{plural(len(trainable_base), 'base-model parameter')} trainable outside the adapter "
            f"({first_names(trainable_base)}): peft_buffers saves what training changes in them with {target}."))
    if unsaved:
        findings.append(_finding(
            "PEFT_BUFFERS_UNSAVED_CHANGES", "warning",
            f"{plural(len(unsaved), 'base-model tensor')} changed while no adapter was active "
            f"({first_names(unsaved)}): no adapter file carries them, and they are the base model's values now."))
    return {"peft_buffers": section, "findings": findings}
