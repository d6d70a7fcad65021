"""check_reload(model, inputs, make_base): save, reload as a user would, compare, and say why outputs differ."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .. import binding as pv
from .._text import plural
from ._common import short_list
from ._explain import explain
from ._reload_causes import (
    LIKELIHOOD,
    SHOWN,
    Cause,
    adapter_cause,
    adapter_dir,
    as_loaded_cause,
    base_causes,
    determinism_causes,
    extra_state_cause,
    file_keys,
)
from ._running import adapt, call, compare, main_float, modes_kept

__all__ = ["ReloadReport", "check_reload"]


@dataclass
class ReloadReport:
    """What :func:`check_reload` found. ``ok`` is True when outputs are bitwise equal and no cause was found."""

    equal: bool
    max_abs_diff: float
    adapter_name: Optional[str]
    outputs_compared: int = 0
    outputs_differing: list[str] = field(default_factory=list)
    causes: list[Cause] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.equal and not self.causes

    @property
    def kinds(self) -> list[str]:
        """The causes' kinds, most likely first."""
        return [cause.kind for cause in self.causes]

    def __str__(self) -> str:
        where = f"compared in eval mode without grad, adapter {self.adapter_name!r}"
        if self.equal:
            head = f"outputs are bitwise equal after reload ({plural(self.outputs_compared, 'output tensor')}; {where})"
        else:
            head = (f"outputs DIFFER after reload: max |Δ| = {self.max_abs_diff:.3g} "
                    f"({len(self.outputs_differing)} of {plural(self.outputs_compared, 'output tensor')}: "
                    f"{short_list(self.outputs_differing)}; {where})")
        lines = [f"peft_buffers.check_reload: {'OK: ' if self.ok else ''}{head}"]
        if self.causes:
            lines.append("Causes, most likely first:")
            for number, cause in enumerate(self.causes, 1):
                text = str(cause).replace("\n", "\n   ")
                lines.append(f"  {number}. {text}")
        else:
            lines.append("No cause of difference found.")
        if self.notes:
            lines.append("Notes:")
            lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _save_and_load(model: nn.Module, make_base: Callable[[], nn.Module], active: str, is_trainable: bool,
                   load_kwargs: Mapping[str, Any], notes: list[str]) -> tuple[nn.Module, set[str]]:
    """Save every adapter to a temporary directory and load them onto ``make_base()`` as a user would."""
    from peft import PeftModel

    names = list(model.peft_config)
    with tempfile.TemporaryDirectory(prefix="peft_buffers_check_") as directory, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(directory)
        saved_keys = file_keys(adapter_dir(directory, active))
        loaded = PeftModel.from_pretrained(make_base(), adapter_dir(directory, active), adapter_name=active,
                                           is_trainable=is_trainable, **dict(load_kwargs))
        for name in names:
            if name != active:
                loaded.load_adapter(adapter_dir(directory, name), adapter_name=name, is_trainable=is_trainable)
        if len(names) > 1:
            loaded.set_adapter(active)
    for warning in caught:
        if issubclass(warning.category, (DeprecationWarning, FutureWarning)):
            continue  # about the libraries' APIs, not about this model
        note = f"warning while saving or loading: {str(warning.message).strip().splitlines()[0]}"
        if note not in notes:
            notes.append(note)
    return loaded, saved_keys


def _eval_outputs(model: nn.Module, loaded: nn.Module, inputs: Any, notes: list[str]):
    """Two eval-mode passes of each model; the loaded model's inputs adapted to it if it needs that."""
    with modes_kept(model):
        model.eval()
        trained = (call(model, inputs), call(model, inputs))
    device, dtype = main_float(loaded)
    with modes_kept(loaded):
        loaded.eval()
        try:
            return trained, (call(loaded, inputs), call(loaded, inputs)), inputs, None
        except Exception as exc:  # noqa: BLE001 - retry as a user of that model would call it
            adapted = adapt(inputs, device, dtype)
            try:
                reloaded = (call(loaded, adapted), call(loaded, adapted))
            except Exception as exc2:  # noqa: BLE001 - reported as a cause
                return trained, None, inputs, exc2
            notes.append(f"the reloaded model failed on the inputs as given ({type(exc).__name__}); it was run on "
                         f"inputs moved to {device} with floats cast to {dtype}")
            return trained, reloaded, adapted, None


# --------------------------------------------------------------------------------------------- the tool


def check_reload(
    model: nn.Module,
    inputs: Any,
    make_base: Callable[[], nn.Module],
    *,
    is_trainable: bool = False,
    load_kwargs: Optional[Mapping[str, Any]] = None,
) -> ReloadReport:
    """Save ``model``'s adapters, load them onto ``make_base()`` as a user would, compare, and diagnose.

    The adapters are saved with ``model.save_pretrained`` to a temporary directory (with whatever patch state
    peft_buffers has now) and loaded with ``PeftModel.from_pretrained(make_base(), ..., is_trainable=...)``
    (plus ``load_adapter`` for further adapters). Both models run on ``inputs`` (a dict of keyword
    arguments, a tensor, or a tuple of positional arguments) in eval mode without grad; the report says
    whether the outputs are bitwise equal, the max |Δ|, and the causes found, most likely first, each with
    its fix: extra state missing from the file, quantization config differs, dtype differs, base weights
    differ, adapter weights differ, adapter merged or disabled in the trained model, a model that is not
    deterministic (two passes differ: in eval mode, or as loaded, e.g. active dropout in train mode after
    ``is_trainable=True``), device differs. The random state is left as it was; module modes are restored.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> def make_base():
        ...     torch.manual_seed(0)
        ...     return torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> model = get_peft_model(make_base(), LoraConfig(target_modules=["0"], init_lora_weights=False))
        >>> report = check_reload(model, torch.ones(2, 4), make_base)
        >>> report.ok, report.kinds
        (True, [])
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"check_reload needs a peft.PeftModel (from get_peft_model or PeftModel.from_pretrained), "
                        f"got {type(model).__name__}")
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # make_base() may seed; forward passes may draw
        return _check_reload(model, inputs, make_base, is_trainable, load_kwargs or {})


def _check_reload(model: nn.Module, inputs: Any, make_base: Callable[[], nn.Module], is_trainable: bool,
                  load_kwargs: Mapping[str, Any]) -> ReloadReport:
    active = pv.active_adapter(model)
    report = ReloadReport(equal=False, max_abs_diff=float("inf"), adapter_name=active)
    loaded, saved_keys = _save_and_load(model, make_base, active, is_trainable, load_kwargs, report.notes)
    explained_model, explained_loaded = explain(model), explain(loaded)
    # State first: saving just brought the trained model's tensors into their saved layout, and the reloaded
    # model has not run yet (bitsandbytes repacks 4-bit weights in place on a CPU eval forward).
    causes: list[Cause] = []
    for finding in explained_model:
        if finding.kind in ("adapters_disabled", "adapter_merged"):
            causes.append(Cause(finding.kind, f"in the trained model, {finding.message}",
                                (f"layers: {short_list(list(finding.modules), SHOWN)}",), finding.fix,
                                LIKELIHOOD[finding.kind]))
    extra_cause, missing = extra_state_cause(model, loaded, active, saved_keys, report.notes)
    causes += [extra_cause] if extra_cause is not None else []
    causes += base_causes(model, loaded, skip=missing)
    adapter_weights = adapter_cause(model, loaded)
    causes += [adapter_weights] if adapter_weights is not None else []
    with torch.no_grad():
        torch.manual_seed(0)
        trained, reloaded, inputs, error = _eval_outputs(model, loaded, inputs, report.notes)
        report.outputs_compared = len(trained[0])
        if reloaded is not None:
            report.equal, report.max_abs_diff, report.outputs_differing = compare(trained[0], reloaded[0])
        causes += determinism_causes(trained, reloaded, explained_model, explained_loaded)
        if reloaded is not None and any(module.training for module in loaded.modules()):
            as_loaded = as_loaded_cause(loaded, inputs, reloaded[0], report.equal, is_trainable, explained_loaded)
            causes += [as_loaded] if as_loaded is not None else []
    if any(module.training for module in model.modules()):
        kinds = [f.kind for f in explained_model if f.kind not in ("adapters_disabled", "adapter_merged", "sampling")]
        why = f": {', '.join(kinds)}, see peft_buffers.explain(model)" if kinds else ""
        report.notes.append(f"the trained model is in train mode (as after training); both models were compared in "
                            f"eval mode, so outputs taken from it in train mode are not comparable{why}")
    report.notes += [str(finding) for finding in explained_model if finding.kind == "sampling"]
    if error is not None:
        causes.append(Cause(
            "reload_fails", f"the reloaded model fails on the inputs: {type(error).__name__}: {error}",
            (), "see the other causes; the base model from make_base() must accept the same inputs",
            LIKELIHOOD["reload_fails"]))
    if not report.equal and not causes:
        causes.append(Cause(
            "unexplained", "outputs differ, and none of the known causes was found",
            (f"outputs that differ: {short_list(report.outputs_differing, SHOWN)}",),
            "compare PEFT/transformers versions and LoraConfig between training and loading; look for state that "
            "is not in the state dict (non-persistent buffers, attributes set during training); run "
            "peft_buffers.explain() on both models",
            LIKELIHOOD["unexplained"]))
    report.causes = sorted(causes, key=lambda cause: -cause.likelihood)
    return report
