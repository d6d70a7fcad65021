"""Why a reloaded model differs: each cause :func:`~peft_buffers.check_reload` can diagnose, with its evidence."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import nn

from .._text import plural
from ..binding import extra_state_for_report, is_enabled
from ..core import RUNNING_STAT_NAMES
from ._common import adapter_tensors, base_tensors, bitwise_equal, short_list
from ._running import call, compare, main_float

__all__ = ["LIKELIHOOD", "SHOWN", "Cause", "adapter_cause", "adapter_dir", "as_loaded_cause", "base_causes",
           "determinism_causes", "extra_state_cause", "file_keys", "quantization_cause"]

# How likely each cause is to explain a difference, given that its evidence was found. Evidence of state
# that differs (missing extra state, another quantization, dtype, weights) outranks circumstantial findings
# (device); a model that is not deterministic in eval mode makes every comparison unreliable, so it comes first.
LIKELIHOOD = {
    "not_deterministic": 100,
    "adapters_disabled": 92,
    "extra_state_missing": 90,
    "adapter_merged": 85,
    "quantization_differs": 80,
    "dtype_differs": 70,
    "base_weights_differ": 60,
    "adapter_weights_differ": 55,
    "reload_fails": 50,
    "device_differs": 30,
    "unexplained": 0,
}
# Not deterministic *as loaded* (train mode) while eval outputs are equal: then it is what the user sees.
_AS_LOADED_ONLY_CAUSE = 95
_AS_LOADED_WITH_OTHER_DIFFERENCES = 45
SHOWN = 5


@dataclass(frozen=True)
class Cause:
    """One diagnosed cause of a difference: what it is, the evidence found, and the fix."""

    kind: str
    title: str
    evidence: tuple[str, ...]
    fix: str
    likelihood: int

    def __str__(self) -> str:
        lines = [f"[{self.kind}] {self.title}"]
        lines += [f"    - {line}" for line in self.evidence]
        lines.append(f"    Fix: {self.fix}")
        return "\n".join(lines)




def file_keys(directory: str) -> set[str]:
    path = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    path = os.path.join(directory, "adapter_model.bin")
    return set(torch.load(path, map_location="cpu", weights_only=True)) if os.path.exists(path) else set()


def adapter_dir(root: str, name: str) -> str:
    return root if name == "default" else os.path.join(root, name)


def _delta(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} in training, {tuple(b.shape)} after reload"
    b = b.to(a.device)
    differ = int((a != b).sum()) if a.dtype == b.dtype else a.numel()
    if a.is_floating_point() and b.is_floating_point() and a.numel():
        delta = float((a.to(torch.float64) - b.to(torch.float64)).abs().max())
        return f"{differ} of {a.numel()} values differ, max |Δ| {delta:.3g}"
    return f"{differ} of {a.numel()} values differ"


def _is_quantized(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ in ("Params4bit", "Int8Params") or hasattr(tensor, "quant_state")


_QUANT_LABELS = {
    "bits": "bits",
    "bnb_4bit_quant_type": "quant type (bnb_4bit_quant_type)",
    "bnb_4bit_compute_dtype": "compute dtype (bnb_4bit_compute_dtype)",
    "bnb_4bit_use_double_quant": "double quant (bnb_4bit_use_double_quant)",
    "bnb_4bit_quant_storage": "quant storage (bnb_4bit_quant_storage)",
}


def _quant_settings(peft_model: nn.Module) -> dict[str, Any]:
    """The base model's quantization config as flat settings; {} when it is not quantized."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        config = getattr(getattr(base, "hf_quantizer", None), "quantization_config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    settings: dict[str, Any] = {}
    bits = 4 if raw.get("load_in_4bit") else 8 if raw.get("load_in_8bit") else raw.get("bits")
    settings["bits"] = bits
    for key, value in raw.items():
        if key.startswith("_") or key in ("load_in_4bit", "load_in_8bit", "bits"):
            continue
        if key.startswith("bnb_4bit_") and bits != 4:
            continue
        settings[key] = str(value) if isinstance(value, torch.dtype) else value
    return settings


def _module_quant(peft_model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer: bits, quant type, double quant, block size (read from the weights)."""
    layers = {}
    for entry in base_tensors(peft_model).values():
        tensor = entry.tensor
        if not _is_quantized(tensor):
            continue
        state = getattr(tensor, "quant_state", None)
        layers[entry.name.rsplit(".", 1)[0]] = {
            "bits": 4 if type(tensor).__name__ == "Params4bit" or state is not None else 8,
            "quant type": getattr(tensor, "quant_type", None) or getattr(state, "quant_type", None),
            "double quant": bool(getattr(state, "nested", getattr(tensor, "compress_statistics", False))),
            "blocksize": getattr(tensor, "blocksize", None) or getattr(state, "blocksize", None),
        }
    return layers


def quantization_cause(model: nn.Module, loaded: nn.Module) -> Optional[Cause]:
    trained, reloaded = _quant_settings(model), _quant_settings(loaded)
    evidence = []
    for key in list(trained) + [k for k in reloaded if k not in trained]:
        a, b = trained.get(key, "(not set)"), reloaded.get(key, "(not set)")
        if a != b:
            evidence.append(f"{_QUANT_LABELS.get(key, key)}: {a!r} in training, {b!r} after reload")
    if trained and not reloaded:
        evidence.insert(0, "the reloaded base model is not quantized")
    if reloaded and not trained:
        evidence.insert(0, "the trained base model was not quantized")
    layers_a, layers_b = _module_quant(model), _module_quant(loaded)
    layer_diffs = []
    for name in list(layers_a) + [n for n in layers_b if n not in layers_a]:
        a, b = layers_a.get(name, {}), layers_b.get(name, {})
        if a != b:
            changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            layer_diffs.append(f"{name}: {', '.join(changed)}")
    if layer_diffs:
        evidence.append(f"{plural(len(layer_diffs), 'quantized layer')} "
                        f"{'differs' if len(layer_diffs) == 1 else 'differ'}, e.g. {layer_diffs[0]}")
    if not evidence:
        return None
    if trained:
        wanted = ", ".join(
            f"{k}={('torch.' + v) if k == 'bnb_4bit_compute_dtype' and isinstance(v, str) else repr(v)}"
            for k, v in trained.items() if k in _QUANT_LABELS and k != "bits"
        )
        load = {4: "load_in_4bit=True", 8: "load_in_8bit=True"}.get(trained.get("bits"), "")
        fix = (f"load the base model with the quantization config used in training: "
               f"BitsAndBytesConfig({', '.join(x for x in (load, wanted) if x)})")
    else:
        fix = "load the base model without quantization, as in training"
    return Cause("quantization_differs",
                 "quantization config differs: the reloaded base model is quantized differently from the trained one",
                 tuple(evidence), fix, LIKELIHOOD["quantization_differs"])


def _merged_modules(model: nn.Module) -> set[int]:
    """ids of base layers into which an adapter is merged."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    found = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and getattr(module, "merged", False):
            found.add(id(getattr(module, "base_layer", module)))  # PEFT 0.6: the tuner layer is the base layer
            found.add(id(module))
    return found


def extra_state_cause(model: nn.Module, loaded: nn.Module, active: Optional[str], saved_keys: set[str],
                       notes: list[str]) -> tuple[Optional[Cause], set[str]]:
    """Extra state (changed buffers and base parameters) that the file lacks although it matters.

    Returns the cause (or None) and every key of extra state that the file lacks.
    """
    expected = extra_state_for_report(model, active) if active is not None else {}
    base_a, base_b = base_tensors(model), base_tensors(loaded)
    missing = {key for key in expected if key not in saved_keys}
    differ = [key for key in expected if key in missing
              and (key not in base_b or not bitwise_equal(expected[key], base_b[key].tensor))]
    if not differ:
        if missing:
            notes.append(f"the adapter file lacks {plural(len(missing), 'key')} of extra state, but "
                         f"{'its value equals' if len(missing) == 1 else 'their values equal'} the fresh base "
                         f"model's, so nothing is lost here")
        return None, missing
    evidence = []
    for key in differ[:SHOWN]:
        entry = base_a.get(key)
        stat = key.rsplit(".", 1)[-1] in RUNNING_STAT_NAMES
        kind = "direct parameter" if entry is None or entry.is_parameter else "running statistic" if stat else "buffer"
        found = _delta(expected[key], base_b[key].tensor) if key in base_b else "absent after reload"
        evidence.append(f"{entry.name if entry is not None else key} ({kind}): {found}")
    if len(differ) > SHOWN:
        evidence.append(f"... and {len(differ) - SHOWN} more")
    fix = ("call peft_buffers.enable() before save_pretrained() (and before loading): the adapter file then "
           "carries every base-model buffer and parameter training changed" if not is_enabled() else
           "peft_buffers is enabled now but these keys were not written: enable it before the model is saved, "
           "and check that saving goes through PEFT's get_peft_model_state_dict")
    cause = Cause(
        "extra_state_missing",
        f"extra state missing from the adapter file: {plural(len(differ), 'tensor')} whose trained "
        f"{'value differs' if len(differ) == 1 else 'values differ'} from the fresh base model's "
        f"{'is' if len(differ) == 1 else 'are'} not in the file, so the reloaded model keeps the base model's "
        f"{'value' if len(differ) == 1 else 'values'}",
        tuple(evidence), fix, LIKELIHOOD["extra_state_missing"])
    return cause, missing


def base_causes(model: nn.Module, loaded: nn.Module, skip: set[str]) -> list[Cause]:
    """Quantization, dtype and value differences between the two base models (keys in ``skip`` excluded)."""
    causes = []
    quant_cause = quantization_cause(model, loaded)
    merged = _merged_modules(model)
    base_a, base_b = base_tensors(model), base_tensors(loaded)
    dtype_pairs: Counter = Counter()
    dtype_examples: list[str] = []
    weight_diffs: list[str] = []
    quant_consequences = 0
    structure: list[str] = []
    for key in list(base_a) + [k for k in base_b if k not in base_a]:
        if key in skip:
            continue
        a, b = base_a.get(key), base_b.get(key)
        if a is None or b is None:
            structure.append(f"{(a or b).name}: only in the {'trained' if b is None else 'reloaded'} model")
            continue
        if id(a.module) in merged:  # explained by the merge
            continue
        ta, tb = a.tensor, b.tensor
        if ta.dtype != tb.dtype:
            dtype_pairs[(ta.dtype, tb.dtype)] += 1
            if len(dtype_examples) < SHOWN:
                dtype_examples.append(a.name)
            continue
        if bitwise_equal(ta, tb):
            continue
        if quant_cause is not None and (_is_quantized(ta) or _is_quantized(tb)):
            quant_consequences += 1  # explained by the other quantization
            continue
        weight_diffs.append(f"{a.name} ({a.what}): {_delta(ta, tb)}")
    if quant_cause is not None:
        if quant_consequences:
            quant_cause = replace(quant_cause, evidence=quant_cause.evidence + (
                f"as a result, {plural(quant_consequences, 'quantized weight')} "
                f"{'holds another value' if quant_consequences == 1 else 'hold other values'}",))
        causes.append(quant_cause)
    if dtype_pairs:
        (train_dtype, _), _ = dtype_pairs.most_common(1)[0]
        name = str(train_dtype).replace("torch.", "")
        causes.append(Cause(
            "dtype_differs",
            f"dtype differs: {plural(sum(dtype_pairs.values()), 'base tensor')} "
            f"{'has' if sum(dtype_pairs.values()) == 1 else 'have'} another dtype after reload",
            tuple(f"{plural(n, 'tensor')}: {a} in training, {b} after reload" for (a, b), n in dtype_pairs.items())
            + (f"e.g. {short_list(dtype_examples, SHOWN)}",),
            f"create the base model in {name} as in training: from_pretrained(..., dtype=torch.{name}) "
            f"(torch_dtype= in older transformers) or base.to(torch.{name})",
            LIKELIHOOD["dtype_differs"]))
    if weight_diffs or structure:
        more = [f"... and {len(weight_diffs) - SHOWN} more"] if len(weight_diffs) > SHOWN else []
        causes.append(Cause(
            "base_weights_differ",
            f"base weights differ: {plural(len(weight_diffs) + len(structure), 'base-model tensor')} of "
            f"make_base() {'differs' if len(weight_diffs) + len(structure) == 1 else 'differ'} from the trained "
            f"model's base",
            tuple(weight_diffs[:SHOWN] + more + structure[:SHOWN]),
            "make_base() must build exactly the base used in training: same checkpoint and revision, same seed "
            "for randomly initialised layers, nothing changed after loading. If training changed these tensors "
            "(see peft_buffers.audit), call peft_buffers.enable() before get_peft_model / from_pretrained: the "
            "adapter file then carries every base tensor training changed",
            LIKELIHOOD["base_weights_differ"]))
    device_a, device_b = main_float(model)[0], main_float(loaded)[0]
    if device_a is not None and device_b is not None and device_a.type != device_b.type:
        causes.append(Cause(
            "device_differs", f"device differs: trained model on {device_a}, reloaded model on {device_b}",
            ("kernels differ between devices, so results are not bitwise equal",),
            f"run both on {device_a.type}", LIKELIHOOD["device_differs"]))
    return causes


def adapter_cause(model: nn.Module, loaded: nn.Module) -> Optional[Cause]:
    adapter_a = adapter_tensors(model, base_tensors(model))
    adapter_b = adapter_tensors(loaded, base_tensors(loaded))
    diffs = []
    for key in list(adapter_a) + [k for k in adapter_b if k not in adapter_a]:
        a, b = adapter_a.get(key), adapter_b.get(key)
        if a is None or b is None:
            diffs.append(f"{(a or b).name}: only in the {'trained' if b is None else 'reloaded'} model")
        elif a.tensor.dtype != b.tensor.dtype:
            diffs.append(f"{a.name}: {a.tensor.dtype} in training, {b.tensor.dtype} after reload")
        elif not bitwise_equal(a.tensor, b.tensor):
            diffs.append(f"{a.name}: {_delta(a.tensor, b.tensor)}")
    if not diffs:
        return None
    return Cause(
        "adapter_weights_differ",
        f"adapter weights differ: {plural(len(diffs), 'adapter tensor')} "
        f"{'is' if len(diffs) == 1 else 'are'} not reproduced by the file",
        tuple(diffs[:SHOWN]),
        "load with the same PEFT version and config as in training; for layers you trained fully, list them "
        "in modules_to_save; for resized or tied embeddings, save with save_embedding_layers=True; when the "
        "base dtype differs, autocast_adapter_dtype changes adapter dtypes",
        LIKELIHOOD["adapter_weights_differ"])


def determinism_causes(trained: tuple, reloaded: Optional[tuple], explained_model, explained_loaded) -> list[Cause]:
    causes = []
    for label, outputs, found in (("trained", trained, explained_model), ("reloaded", reloaded, explained_loaded)):
        if outputs is None:
            continue
        same, delta, _ = compare(*outputs)
        if not same:
            causes.append(Cause(
                "not_deterministic",
                f"the {label} model is not deterministic on its own: two forward passes in eval mode differ "
                f"(max |Δ| {delta:.3g})",
                tuple(str(f) for f in found),
                "find the module that draws random numbers in eval mode (custom dropout, noise, sampling); on "
                "CUDA, also try torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8",
                LIKELIHOOD["not_deterministic"]))
    return causes


def as_loaded_cause(loaded: nn.Module, inputs: Any, eval_outputs: list, eval_equal: bool,
                     is_trainable: bool, explained_loaded) -> Optional[Cause]:
    """Run the reloaded model in the mode loading left it in (train mode: last, as it moves running statistics)."""
    runs = (call(loaded, inputs), call(loaded, inputs))
    runs_same, runs_delta, _ = compare(*runs)
    mode_same, mode_delta, _ = compare(runs[0], eval_outputs)
    if runs_same and mode_same:
        return None
    how = (f"two forward passes differ (max |Δ| {runs_delta:.3g})" if not runs_same else
           f"its outputs in that mode differ from eval mode (max |Δ| {mode_delta:.3g})")
    loaded_how = "it was loaded with is_trainable=True and " if is_trainable else ""
    return Cause(
        "not_deterministic",
        f"the reloaded model is not deterministic as loaded: {loaded_how}it is in train mode, and {how}",
        tuple(str(f) for f in explained_loaded) or ("modules in train mode change the outputs",),
        "call model.eval() before predicting (PEFT leaves a model loaded with is_trainable=True in train mode); "
        "for deterministic training outputs, set lora_dropout=0",
        _AS_LOADED_ONLY_CAUSE if eval_equal else _AS_LOADED_WITH_OTHER_DIFFERENCES)
