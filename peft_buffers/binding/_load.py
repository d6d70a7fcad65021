"""Loading: PEFT's ``set_peft_model_state_dict`` wrapped to take the extra state out, validate it before
anything changes, and keep it as the loaded adapter's own, all inside one transaction."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Callable

from .._errors import PeftBuffersWarning
from ..core import active_transaction, atomic, plan_load, raise_for_mismatches, verify_adapter_path
from . import _current
from . import _peft_view as pv
from ._native_fields import model_uses_native_fields
from ._versions import params

__all__ = ["atomic_unless_covered", "check_file_once", "load_transaction", "make_set"]


def make_set(original: Callable, peft_saved_keys: Callable) -> Callable:
    signature = inspect.signature(original)
    sd_param = params(original)[1]

    @functools.wraps(original)
    def set_peft_model_state_dict(*args, **kwargs):
        if _current.patch is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        root = bound.arguments["model"]
        if model_uses_native_fields(root):  # issue 11: this PEFT loads the model's extra state itself
            return original(*args, **kwargs)
        adapter_name = bound.arguments["adapter_name"]
        incoming = bound.arguments[sd_param]
        fresh = pv.attach_walk(root)  # the store attached during this load: its walk holds, nothing moved yet
        plan = plan_load(
            pv.model_view(root),
            incoming,
            found=fresh,
            claimed_by_peft=lambda candidates: peft_saved_keys(root, adapter_name, candidates),
            wraps_for_adapter=pv.wraps_for(adapter_name),
            ignore_mismatched_sizes=bool(bound.arguments.get("ignore_mismatched_sizes", False)),
            check_values=_current.patch.check_values,
        )
        raise_for_mismatches(plan, adapter_name)  # before anything changes
        for dropped in plan.dropped:
            warnings.warn(f"ignore_mismatched_sizes=True: not loading extra state {dropped}", PeftBuffersWarning,
                          stacklevel=2)
        describe = f"adapter {adapter_name!r} (set_peft_model_state_dict)"
        if not plan.extra and not plan.dropped:
            with atomic_unless_covered(root, describe):  # a stock PEFT file: stock behaviour, but atomic
                return original(*args, **kwargs)
        bound.arguments[sd_param] = plan.passthrough
        # The store's own snapshot (ExtraStateStore.__peft_buffers_snapshot__) puts back every tensor it swaps.
        with atomic_unless_covered(root, describe):
            result = original(*bound.args, **bound.kwargs)
            store = pv.ensure_store(root, late="load")  # not seen at attach: base values unknown
            if fresh is None:
                pv.settle(root, store, peft_saved_keys, plan.found)  # what the live adapter changed stays its own
            config = root.peft_config[adapter_name] if hasattr(root, "peft_config") else None
            trainable = not getattr(config, "inference_mode", True)
            store.set_values(adapter_name, plan.extra, trainable=trainable)
            pv.sync(root, peft_saved_keys)
        if hasattr(result, "missing_keys") and hasattr(result, "_replace"):
            ours = {place.live_key for place, _ in plan.extra.values()} | set(plan.extra)
            ours |= {m.key for m in plan.dropped}
            result = result._replace(missing_keys=[k for k in result.missing_keys if k not in ours])
        return result

    return set_peft_model_state_dict


def _peft_class(cls: type) -> bool:
    return cls.__module__.partition(".")[0] == "peft"


def load_transaction(root, describe: str):
    """``atomic(root)`` for a load through PEFT: PEFT's own modules (tuner layers, wrappers, the PeftModel) are
    snapshotted in full, the base model's modules lightly (a load changes them only by wrapping them)."""
    return atomic(root, describe=describe, deep=_peft_class)


def check_file_once(root, model_id, subfolder) -> None:
    """:func:`~peft_buffers.core.check_adapter_path` for a load into ``root``, once per load: the header of a
    file that ``PeftModel.from_pretrained`` checked is not read again by the ``load_adapter`` it calls."""
    transaction = pv.covering_transaction(root)
    checked = transaction.memo.setdefault("checked_files", set()) if transaction is not None else set()
    if (str(model_id), subfolder) in checked:
        return
    verify_adapter_path(model_id, subfolder)
    checked.add((str(model_id), subfolder))


def atomic_unless_covered(root, describe: str):
    """``atomic(root)``, unless ``PeftModel.from_pretrained`` already runs one on ``root``'s base model: the
    PeftModel it builds is thrown away with any failure, so a second snapshot would only cost time."""
    get_base = getattr(type(root), "get_base_model", None)
    if callable(get_base) and active_transaction(get_base(root)) is not None:
        return contextlib.nullcontext()
    return load_transaction(root, describe)


