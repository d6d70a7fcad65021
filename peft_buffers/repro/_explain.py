"""explain(model): what makes this model's outputs depend on its mode or on the run, right now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .. import binding as pv
from .._text import plural
from ..core import tracks_running_stats
from ._common import display_name, short_list

__all__ = ["Explanation", "Finding", "explain"]

# Float attributes through which modules apply dropout functionally (transformers' attention modules keep
# `attention_dropout` and call F.dropout / sdpa with it only in train mode).
_FUNCTIONAL_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "attn_pdrop",
                             "resid_pdrop", "embd_pdrop", "drop_prob", "drop_path_rate")

_FIX_EVAL = "call model.eval() before predicting"


@dataclass(frozen=True)
class Finding:
    """One thing that makes outputs mode- or run-dependent, with the modules it concerns and the fix."""

    kind: str
    message: str
    fix: str
    modules: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f" (in {short_list(list(self.modules))})" if self.modules else ""
        return f"{self.message}{where}. Fix: {self.fix}."


class Explanation:
    """The findings of :func:`explain`; ``str()`` gives one line each, ``bool()`` is True when there are any."""

    def __init__(self, findings: list[Finding]):
        self.findings = list(findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def __bool__(self) -> bool:
        return bool(self.findings)

    @property
    def kinds(self) -> list[str]:
        return [finding.kind for finding in self.findings]

    def __str__(self) -> str:
        if not self.findings:
            return "peft_buffers.explain: nothing makes this model's outputs mode- or run-dependent right now."
        count = len(self.findings)
        lines = [f"peft_buffers.explain: {plural(count, 'thing')} {'makes' if count == 1 else 'make'} this model's "
                 f"outputs mode- or run-dependent right now:"]
        lines += [f"  - {finding}" for finding in self.findings]
        return "\n".join(lines)

    __repr__ = __str__


def _tuner_layer_class():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # plain torch model, no PEFT
        return None
    return BaseTunerLayer


def _group(found: dict[tuple, list[str]]) -> Iterator[tuple[tuple, tuple[str, ...]]]:
    for key, names in found.items():
        yield key, tuple(names)


def explain(model: nn.Module) -> Explanation:
    """List what makes ``model``'s outputs depend on its mode or on the run right now, one line each with the fix.

    Looks for modules in train mode with active dropout (``nn.Dropout`` and its kin, PEFT's ``lora_dropout``,
    attention dropout applied functionally), normalisation layers with running statistics in train mode,
    PEFT adapters that are disabled or merged into the base weights, and sampling in the generation config.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.BatchNorm1d(2))
        >>> explain(net).kinds
        ['dropout', 'norm_train_mode']
        >>> explain(net.eval()).kinds
        []
    """
    tuner_layer = _tuner_layer_class()
    prefix = pv.model_view(model).base_prefix if tuner_layer is not None else ""
    dropouts: dict[tuple, list[str]] = {}
    functional: dict[tuple, list[str]] = {}
    norms: dict[tuple, list[str]] = {}
    disabled: list[str] = []
    merged: dict[tuple, list[str]] = {}
    tuner_children: set[int] = set()

    for key, module in model.named_modules():
        name = display_name(key, prefix) or type(module).__name__
        if tuner_layer is not None and isinstance(module, tuner_layer):
            if getattr(module, "disable_adapters", False):
                disabled.append(name)
            adapters = tuple(getattr(module, "merged_adapters", ()) or ())
            if adapters:
                merged.setdefault(adapters, []).append(name)
            for child_name, child in module.named_modules():
                if child_name and not child_name.startswith("base_layer"):
                    tuner_children.add(id(child))
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            segments = key.split(".")
            adapter_dropout = next((s for s in reversed(segments) if s.endswith("_dropout")), None)
            if id(module) in tuner_children and adapter_dropout is not None:
                dropouts.setdefault((f"PEFT {adapter_dropout} (adapter {segments[-1]!r})", module.p), []).append(
                    name)
            else:
                dropouts.setdefault((type(module).__name__, module.p), []).append(name)
            continue
        if tracks_running_stats(module):
            norms.setdefault((type(module).__name__,), []).append(name)
            continue
        for attr in _FUNCTIONAL_DROPOUT_ATTRS:
            value = module.__dict__.get(attr)
            if isinstance(value, float) and 0.0 < value < 1.0:
                functional.setdefault((type(module).__name__, attr, value), []).append(name)
                break

    findings: list[Finding] = []
    for (label, p), names in _group(dropouts):
        kind = "lora_dropout" if label.startswith("PEFT lora_dropout") else "dropout"
        extra = " (PEFT leaves a model loaded with is_trainable=True in train mode)" if label.startswith("PEFT") else ""
        findings.append(Finding(
            kind,
            f"{plural(len(names), f'{label} module')} with p={p:g} in train mode "
            f"{'drops' if len(names) == 1 else 'drop'} random activations on every forward{extra}",
            f"{_FIX_EVAL}" + (", or set lora_dropout=0 in the LoraConfig" if kind == "lora_dropout" else ""),
            names,
        ))
    for (cls, attr, value), names in _group(functional):
        findings.append(Finding(
            "functional_dropout",
            f"{plural(len(names), f'{cls} module')} in train mode {'applies' if len(names) == 1 else 'apply'} "
            f"dropout inside forward ({attr}={value:g})",
            _FIX_EVAL,
            names,
        ))
    for (cls,), names in _group(norms):
        findings.append(Finding(
            "norm_train_mode",
            f"{plural(len(names), f'{cls} layer')} in train mode "
            + ("normalises with the batch's statistics and overwrites its" if len(names) == 1 else
               "normalise with the batch's statistics and overwrite their")
            + " running statistics on every forward",
            _FIX_EVAL,
            names,
        ))
    if disabled:
        findings.append(Finding(
            "adapters_disabled",
            f"adapters are disabled in {plural(len(disabled), 'PEFT layer')}: the model computes as the base model",
            "leave the `with model.disable_adapter():` block, or call model.enable_adapter_layers()",
            tuple(disabled),
        ))
    for adapters, names in _group(merged):
        findings.append(Finding(
            "adapter_merged",
            f"{'adapter' if len(adapters) == 1 else 'adapters'} {', '.join(map(repr, adapters))} merged into the "
            f"base weights of {plural(len(names), 'layer')}: "
            f"merged weights round differently from an unmerged model, and the saved file holds unmerged weights",
            "call model.unmerge_adapter() before comparing with a reloaded (unmerged) model, or merge both",
            names,
        ))
    generation_config = getattr(_base_model(model), "generation_config", None)
    if getattr(generation_config, "do_sample", False):
        findings.append(Finding(
            "sampling",
            "generation_config.do_sample=True: generate() draws random tokens, so its output depends on the "
            "random seed",
            "call torch.manual_seed(N) right before each generate(), or pass do_sample=False",
        ))
    return Explanation(findings)


def _base_model(model: nn.Module) -> nn.Module:
    getter = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(getter) else model
