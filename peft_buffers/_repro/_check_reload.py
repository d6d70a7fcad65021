"""check_reload(model, inputs, make_base): save, reload as a user would, compare, and say why outputs differ."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .. import _peft_view as pv
from .._patch import is_enabled
from .._public import extra_state_dict
from .._state import RUNNING_STAT_NAMES
from ._common import adapter_tensors, base_tensors, bitwise_equal, iter_tensors, short_list
from ._explain import explain

__all__ = ["Cause", "ReloadReport", "check_reload"]

# How likely each cause is to explain a difference, given that its evidence was found. Evidence of state
# that differs (missing extra state, another quantization, dtype, weights) outranks circumstantial findings
# (device); a model that is not deterministic in eval mode makes every comparison unreliable, so it comes first.
_LIKELIHOOD = {
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
_SHOWN = 5


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
            head = f"outputs are bitwise equal after reload ({self.outputs_compared} output tensor(s); {where})"
        else:
            head = (f"outputs DIFFER after reload: max |Δ| = {self.max_abs_diff:.3g} "
                    f"({len(self.outputs_differing)} of {self.outputs_compared} output tensor(s): "
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


# ------------------------------------------------------------------------------------------ running models


def _main_float(model: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    for tensor in model.parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            return tensor.device, tensor.dtype
    return None, None


def _adapt(value: Any, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Any:
    """Inputs moved to ``device`` with floating tensors cast to ``dtype`` (what a user of that model does)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() and dtype else value.dtype)
    if isinstance(value, Mapping):
        return {k: _adapt(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_adapt(v, device, dtype) for v in value)
    return value


def _call(model: nn.Module, inputs: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(inputs, Mapping):
        output = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        output = model(*inputs)
    else:
        output = model(inputs)
    return [(path, tensor.detach()) for path, tensor in iter_tensors(output)]


def _compare(a: list, b: list) -> tuple[bool, float, list[str]]:
    """(bitwise equal, max |Δ| over floating outputs, paths that differ)."""
    if [path for path, _ in a] != [path for path, _ in b]:
        return False, float("inf"), ["(output structure)"]
    differing, max_abs = [], 0.0
    for (path, x), (_, y) in zip(a, b):
        if bitwise_equal(x, y):
            continue
        differing.append(path)
        if x.shape != y.shape:
            max_abs = float("inf")
        elif x.numel() and (x.is_floating_point() or y.is_floating_point()):
            delta = (x.to(torch.float64) - y.to(device=x.device, dtype=torch.float64)).abs()
            max_abs = max(max_abs, float(torch.nan_to_num(delta, nan=float("inf")).max()))
        else:
            max_abs = max(max_abs, float("inf") if x.dtype.is_complex else 1.0)
    return not differing, max_abs, differing


@contextlib.contextmanager
def _modes_kept(model: nn.Module):
    """Restore every module's own train/eval flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


# ------------------------------------------------------------------------------------------- diagnosis


def _file_keys(directory: str) -> set[str]:
    path = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    path = os.path.join(directory, "adapter_model.bin")
    return set(torch.load(path, map_location="cpu", weights_only=True)) if os.path.exists(path) else set()


def _adapter_dir(root: str, name: str) -> str:
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


def _quantization_cause(model: nn.Module, loaded: nn.Module) -> Optional[Cause]:
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
        evidence.append(f"{len(layer_diffs)} quantized layer(s) differ, e.g. {layer_diffs[0]}")
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
                 tuple(evidence), fix, _LIKELIHOOD["quantization_differs"])


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


def _extra_state_cause(model: nn.Module, loaded: nn.Module, active: Optional[str], saved_keys: set[str],
                       notes: list[str]) -> tuple[Optional[Cause], set[str]]:
    """Extra state (changed buffers and base parameters) that the file lacks although it matters.

    Returns the cause (or None) and every key of extra state that the file lacks.
    """
    expected = extra_state_dict(model, active) if active is not None else {}
    base_a, base_b = base_tensors(model), base_tensors(loaded)
    missing = {key for key in expected if key not in saved_keys}
    differ = [key for key in expected if key in missing
              and (key not in base_b or not bitwise_equal(expected[key], base_b[key].tensor))]
    if not differ:
        if missing:
            notes.append(f"the adapter file lacks {len(missing)} key(s) of extra state, but their values equal "
                         f"the fresh base model's, so nothing is lost here")
        return None, missing
    evidence = []
    for key in differ[:_SHOWN]:
        entry = base_a.get(key)
        stat = key.rsplit(".", 1)[-1] in RUNNING_STAT_NAMES
        kind = "direct parameter" if entry is None or entry.is_parameter else "running statistic" if stat else "buffer"
        found = _delta(expected[key], base_b[key].tensor) if key in base_b else "absent after reload"
        evidence.append(f"{entry.name if entry is not None else key} ({kind}): {found}")
    if len(differ) > _SHOWN:
        evidence.append(f"... and {len(differ) - _SHOWN} more")
    fix = ("call peft_buffers.enable() before save_pretrained() (and before loading): the adapter file then "
           "carries every base-model buffer and parameter training changed" if not is_enabled() else
           "peft_buffers is enabled now but these keys were not written: enable it before the model is saved, "
           "and check that saving goes through PEFT's get_peft_model_state_dict")
    cause = Cause(
        "extra_state_missing",
        f"extra state missing from the adapter file: {len(differ)} tensor(s) whose trained values differ from "
        f"the fresh base model's are not in the file, so the reloaded model keeps the base model's values",
        tuple(evidence), fix, _LIKELIHOOD["extra_state_missing"])
    return cause, missing


def _base_causes(model: nn.Module, loaded: nn.Module, skip: set[str]) -> list[Cause]:
    """Quantization, dtype and value differences between the two base models (keys in ``skip`` excluded)."""
    causes = []
    quant_cause = _quantization_cause(model, loaded)
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
            if len(dtype_examples) < _SHOWN:
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
                f"as a result, {quant_consequences} quantized weight(s) hold other values",))
        causes.append(quant_cause)
    if dtype_pairs:
        (train_dtype, _), _ = dtype_pairs.most_common(1)[0]
        name = str(train_dtype).replace("torch.", "")
        causes.append(Cause(
            "dtype_differs",
            f"dtype differs: {sum(dtype_pairs.values())} base tensor(s) have another dtype after reload",
            tuple(f"{n} tensor(s): {a} in training, {b} after reload" for (a, b), n in dtype_pairs.items())
            + (f"e.g. {short_list(dtype_examples, _SHOWN)}",),
            f"create the base model in {name} as in training: from_pretrained(..., dtype=torch.{name}) "
            f"(torch_dtype= in older transformers) or base.to(torch.{name})",
            _LIKELIHOOD["dtype_differs"]))
    if weight_diffs or structure:
        more = [f"... and {len(weight_diffs) - _SHOWN} more"] if len(weight_diffs) > _SHOWN else []
        causes.append(Cause(
            "base_weights_differ",
            f"base weights differ: {len(weight_diffs) + len(structure)} base-model tensor(s) of make_base() differ "
            f"from the trained model's base",
            tuple(weight_diffs[:_SHOWN] + more + structure[:_SHOWN]),
            "make_base() must build exactly the base used in training: same checkpoint and revision, same seed "
            "for randomly initialised layers, nothing changed after loading. If training changed these tensors "
            "(see peft_buffers.audit), call peft_buffers.enable() before get_peft_model / from_pretrained: the "
            "adapter file then carries every base tensor training changed",
            _LIKELIHOOD["base_weights_differ"]))
    device_a, device_b = _main_float(model)[0], _main_float(loaded)[0]
    if device_a is not None and device_b is not None and device_a.type != device_b.type:
        causes.append(Cause(
            "device_differs", f"device differs: trained model on {device_a}, reloaded model on {device_b}",
            ("kernels differ between devices, so results are not bitwise equal",),
            f"run both on {device_a.type}", _LIKELIHOOD["device_differs"]))
    return causes


def _adapter_cause(model: nn.Module, loaded: nn.Module) -> Optional[Cause]:
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
        f"adapter weights differ: {len(diffs)} adapter tensor(s) are not reproduced by the file",
        tuple(diffs[:_SHOWN]),
        "load with the same PEFT version and config as in training; for layers you trained fully, list them "
        "in modules_to_save; for resized or tied embeddings, save with save_embedding_layers=True; when the "
        "base dtype differs, autocast_adapter_dtype changes adapter dtypes",
        _LIKELIHOOD["adapter_weights_differ"])


def _save_and_load(model: nn.Module, make_base: Callable[[], nn.Module], active: str, is_trainable: bool,
                   load_kwargs: Mapping[str, Any], notes: list[str]) -> tuple[nn.Module, set[str]]:
    """Save every adapter to a temporary directory and load them onto ``make_base()`` as a user would."""
    from peft import PeftModel

    names = list(model.peft_config)
    with tempfile.TemporaryDirectory(prefix="peft_buffers_check_") as directory, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(directory)
        saved_keys = _file_keys(_adapter_dir(directory, active))
        loaded = PeftModel.from_pretrained(make_base(), _adapter_dir(directory, active), adapter_name=active,
                                           is_trainable=is_trainable, **dict(load_kwargs))
        for name in names:
            if name != active:
                loaded.load_adapter(_adapter_dir(directory, name), adapter_name=name, is_trainable=is_trainable)
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
    with _modes_kept(model):
        model.eval()
        trained = (_call(model, inputs), _call(model, inputs))
    device, dtype = _main_float(loaded)
    with _modes_kept(loaded):
        loaded.eval()
        try:
            return trained, (_call(loaded, inputs), _call(loaded, inputs)), inputs, None
        except Exception as exc:  # noqa: BLE001 - retry as a user of that model would call it
            adapted = _adapt(inputs, device, dtype)
            try:
                reloaded = (_call(loaded, adapted), _call(loaded, adapted))
            except Exception as exc2:  # noqa: BLE001 - reported as a cause
                return trained, None, inputs, exc2
            notes.append(f"the reloaded model failed on the inputs as given ({type(exc).__name__}); it was run on "
                         f"inputs moved to {device} with floats cast to {dtype}")
            return trained, reloaded, adapted, None


def _determinism_causes(trained: tuple, reloaded: Optional[tuple], explained_model, explained_loaded) -> list[Cause]:
    causes = []
    for label, outputs, found in (("trained", trained, explained_model), ("reloaded", reloaded, explained_loaded)):
        if outputs is None:
            continue
        same, delta, _ = _compare(*outputs)
        if not same:
            causes.append(Cause(
                "not_deterministic",
                f"the {label} model is not deterministic on its own: two forward passes in eval mode differ "
                f"(max |Δ| {delta:.3g})",
                tuple(str(f) for f in found),
                "find the module that draws random numbers in eval mode (custom dropout, noise, sampling); on "
                "CUDA, also try torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8",
                _LIKELIHOOD["not_deterministic"]))
    return causes


def _as_loaded_cause(loaded: nn.Module, inputs: Any, eval_outputs: list, eval_equal: bool,
                     is_trainable: bool, explained_loaded) -> Optional[Cause]:
    """Run the reloaded model in the mode loading left it in (train mode: last, as it moves running statistics)."""
    runs = (_call(loaded, inputs), _call(loaded, inputs))
    runs_same, runs_delta, _ = _compare(*runs)
    mode_same, mode_delta, _ = _compare(runs[0], eval_outputs)
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
                                (f"layers: {short_list(list(finding.modules), _SHOWN)}",), finding.fix,
                                _LIKELIHOOD[finding.kind]))
    extra_cause, missing = _extra_state_cause(model, loaded, active, saved_keys, report.notes)
    causes += [extra_cause] if extra_cause is not None else []
    causes += _base_causes(model, loaded, skip=missing)
    adapter_cause = _adapter_cause(model, loaded)
    causes += [adapter_cause] if adapter_cause is not None else []
    with torch.no_grad():
        torch.manual_seed(0)
        trained, reloaded, inputs, error = _eval_outputs(model, loaded, inputs, report.notes)
        report.outputs_compared = len(trained[0])
        if reloaded is not None:
            report.equal, report.max_abs_diff, report.outputs_differing = _compare(trained[0], reloaded[0])
        causes += _determinism_causes(trained, reloaded, explained_model, explained_loaded)
        if reloaded is not None and any(module.training for module in loaded.modules()):
            as_loaded = _as_loaded_cause(loaded, inputs, reloaded[0], report.equal, is_trainable, explained_loaded)
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
            _LIKELIHOOD["reload_fails"]))
    if not report.equal and not causes:
        causes.append(Cause(
            "unexplained", "outputs differ, and none of the known causes was found",
            (f"outputs that differ: {short_list(report.outputs_differing, _SHOWN)}",),
            "compare PEFT/transformers versions and LoraConfig between training and loading; look for state that "
            "is not in the state dict (non-persistent buffers, attributes set during training); run "
            "peft_buffers.explain() on both models",
            _LIKELIHOOD["unexplained"]))
    report.causes = sorted(causes, key=lambda cause: -cause.likelihood)
    return report
