"""The identity of the base model a PEFT model computes with, and the record of it in each adapter folder.

Base values, not live ones: a tensor that training changed is fingerprinted as it was before training (the
store keeps a copy of every persistent buffer and of every parameter before an optimizer first steps it, and
the base value of every tensor an adapter owns); every other tensor's live value is its base value. So the
identity recorded at save describes the base the adapter was created on, whatever training did to it.

Fingerprints of a model's base are kept (per base module, weakly) and reused while each tensor is the same
object (or a view of the same object) with the same data pointer, version counter, dtype and shape: a second
load into the same model does not read the base again.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional

import torch
from torch import nn

from ..core import (
    BASE,
    BaseIdentity,
    TensorPlace,
    TensorRecord,
    find_base_tensors,
    find_weights_file,
    start_fingerprints,
    write_sidecar,
)
from . import _peft_view as pv
from ._quantization import (
    describe_model_quantization,
    quant_state,
    quantized_label,
    saved_layout,
    saved_layout_dtype_and_shape,
)

__all__ = [
    "CARRIED", "IN_PLACE_BIAS", "MERGED", "UNKNOWN_BASE", "adapter_folders", "live_identity", "record_identities",
]

CARRIED = "carried by the adapter file"
MERGED = "merged into by an adapter when saved"
UNKNOWN_BASE = "base value unknown"
# PEFT 0.6 built its IA3 layers in place of the base layer (subclasses of nn.Conv2d / nn.Linear), and the Conv2d
# kept its own random bias where the base conv had none: such a bias is not known to be the base model's, so it is
# left out (a bias-less base conv would otherwise read as "another base" at every load).
IN_PLACE_BIAS = "bias of an IA3 layer PEFT built in place of the base layer"
_SAVED_PREFIX = "base_model.model."

_cache_lock = threading.Lock()
# base module -> {base key: (weak tensor, validity, fingerprint)}
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple]] = weakref.WeakKeyDictionary()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _materialized(tensor: torch.Tensor) -> bool:
    """False for a sharded or partitioned tensor (FSDP2's DTensor, DeepSpeed ZeRO-3), whose local data is not
    the tensor: no identity can be computed from it."""
    kind = type(tensor)
    if kind is torch.Tensor or kind is nn.Parameter:  # the common case, without an attribute lookup
        return True
    return kind.__name__ != "DTensor" and not hasattr(tensor, "ds_id")


class _Base:
    """One walk of a model's base: every base tensor with its base value."""

    def __init__(self, root: nn.Module):
        self.view = pv.model_view(root)
        self.found = find_base_tensors(self.view)
        self.store = pv.attached_store(root)
        self.prefix = self.view.base_prefix
        places = self.store.places.items() if self.store is not None else ()
        self._store_keys = {(id(p.module), p.name): key for key, p in places}

    def name(self, key: str) -> str:
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def value(self, key: str, place: TensorPlace) -> torch.Tensor:
        store, tensor = self.store, place.tensor
        if store is None:
            return tensor
        # The store may know the tensor under the name a file gave it (``mid.base_layer.weight`` for ``mid.weight``
        # when the saving model had the wrapper): look it up by where it lives.
        key = self._store_keys.get((id(place.module), place.name), key)
        if store.source(store.live, key) is not BASE:  # the live adapter owns it: the base value is kept aside
            kept = store.stored.get(BASE, {}).get(key)
            if kept is not None:
                return kept if isinstance(kept, torch.Tensor) else kept.tensor()
        reference = store.reference.get(key)
        if reference is not None and not isinstance(reference, torch.Tensor):
            reference = reference.tensor()  # kept inside one flat copy of many: a view of it, the store unchanged
        return reference if reference is not None else tensor


def _owner(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage ``tensor`` is (itself, or the one it views: a view is made anew on every look)."""
    return tensor._base if tensor._base is not None else tensor


def _validity(tensor: torch.Tensor) -> tuple:
    state = quant_state(tensor)
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape), tensor.device,
            bool(getattr(state, "packing_format_for_cpu", False)))


def _start_fingerprints(base_module: nn.Module, wanted: Mapping[str, torch.Tensor]
                        ) -> Callable[[], dict[str, Optional[int]]]:
    """Start the fingerprints of ``wanted`` (name in the base model -> base value, read in its saved layout),
    reusing those kept for ``base_module``; returns the function that waits and returns them all."""
    with _cache_lock:
        kept = _FINGERPRINTS.get(base_module)
        if kept is None:
            kept = {}
            _FINGERPRINTS[base_module] = kept
        result: dict[str, Optional[int]] = {}
        missing: dict[str, torch.Tensor] = {}
        for key, tensor in wanted.items():
            entry = kept.get(key)
            if entry is not None and entry[0]() is _owner(tensor) and entry[1] == _validity(tensor):
                result[key] = entry[2]
            else:
                missing[key] = tensor
    finish = start_fingerprints([saved_layout(t) for t in missing.values()]) if missing else list

    def done() -> dict[str, Optional[int]]:
        computed = finish()
        with _cache_lock:
            for (key, tensor), value in zip(missing.items(), computed):
                result[key] = value
                try:
                    kept[key] = (weakref.ref(_owner(tensor)), _validity(tensor), value)
                except TypeError:  # a tensor that takes no weak reference: not kept
                    pass
        return result

    return done


def live_identity(root: nn.Module, compare_with: Optional[BaseIdentity] = None, skip: Collection[str] = ()
                  ) -> BaseIdentity:
    """The identity of the base ``root`` computes with (a base model, a ``PeftModel`` or a model with adapters).

    With ``compare_with``, fingerprints are computed only for tensors it records with the same dtype, shape and
    quantization (the others differ already); tensors named in ``skip`` get no fingerprint.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> identity = live_identity(net)
        >>> list(identity.tensors)[:3], identity.quantization
        (['0.weight', '0.bias', '1.weight'], None)
    """
    base = _Base(root)
    records: dict[str, tuple[str, tuple[int, ...], Optional[str]]] = {}
    wanted: dict[str, torch.Tensor] = {}
    for key, place in base.found.ordered.items():
        name = base.name(key)
        value = base.value(key, place)
        dtype, shape = saved_layout_dtype_and_shape(value)
        record = (_dtype_name(dtype), shape, quantized_label(place.tensor))
        records[name] = record
        if name in skip:
            continue
        if compare_with is not None:
            was = compare_with.tensors.get(name)
            if was is None or was.fingerprint is None or (was.dtype, was.shape, was.quantized) != record:
                continue
        if _materialized(value):
            wanted[name] = value
    finish = _start_fingerprints(base.view.base, wanted)
    # while an accelerator reads the tensors: the quantization description
    weights = ((p.module, p.tensor) for p in base.found.parameters.values() if p.name == "weight")
    quantization = describe_model_quantization(root, weights)
    values = finish()
    tensors = {name: TensorRecord(dtype, shape, values.get(name), quantized)
               for name, (dtype, shape, quantized) in records.items()}
    return BaseIdentity(tensors, quantization)


# ------------------------------------------------------------------------------------------------ saving


def adapter_folders(model: nn.Module, folder: str) -> dict[str, Path]:
    """The folder each adapter of ``model`` was just saved to under ``folder`` (those with a weights file).

    A ``PeftModel`` saves adapter ``default`` into ``folder`` and any other into ``folder/<name>``; a
    transformers model with adapters saves its active adapter into ``folder``.

    Example:
        >>> adapter_folders(nn.Linear(1, 1), "/nonexistent")
        {}
    """
    names = list(getattr(model, "peft_config", None) or {})
    if callable(getattr(type(model), "get_base_model", None)):
        candidates = {name: Path(folder) if name == "default" else Path(folder) / name for name in names}
    else:
        active = pv.active_adapter(model)
        candidates = {active: Path(folder)} if active in names else {}
    return {name: path for name, path in candidates.items() if find_weights_file(path) in
            (path / "adapter_model.safetensors", path / "adapter_model.bin")}


def _file_keys(path: Path) -> set[str]:
    """The tensor names an adapter weights file carries (the safetensors header alone; a pickle is read)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    else:
        keys = set(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))
    return keys | {k[len(_SAVED_PREFIX):] for k in keys if k.startswith(_SAVED_PREFIX)}


def _left_out(model: nn.Module, base: _Base, adapter: str, carried_keys: set[str]) -> dict[str, list[str]]:
    """Base tensors not recorded for ``adapter``, by reason: what its file carries (its own keys, and the
    modules its ``modules_to_save`` copies replace), what an adapter was merged into, unknown base values, the
    bias of an IA3 layer built in place of the base layer (:data:`IN_PLACE_BIAS`)."""
    copies, merged = set(), set()
    wrappers, tuner_layers = pv._peft_classes()
    for module in model.modules():
        if isinstance(module, wrappers):
            holder = module._modules.get("modules_to_save")
            if holder is not None and adapter in getattr(holder, "_modules", {}):
                original = module._modules.get("original_module")
                copies |= {id(t) for t in original.state_dict(keep_vars=True).values()} if original else set()
        elif isinstance(module, tuner_layers) and getattr(module, "merged", False):
            layer = module._modules.get("base_layer", module)
            merged |= {id(t) for t in layer._parameters.values() if t is not None}
    unknown = getattr(base.store, "unknown_base", set())
    reasons: dict[str, list[str]] = {CARRIED: [], MERGED: [], UNKNOWN_BASE: [], IN_PLACE_BIAS: []}
    for key, place in base.found.ordered.items():
        tensor = place.tensor
        if place.saved_key in carried_keys or id(tensor) in copies:
            reasons[CARRIED].append(base.name(key))
        elif id(tensor) in merged:
            reasons[MERGED].append(base.name(key))
        elif key in unknown:
            reasons[UNKNOWN_BASE].append(base.name(key))
        elif place.name == "bias" and _built_in_place(place.module, tuner_layers):
            reasons[IN_PLACE_BIAS].append(base.name(key))
    return {reason: names for reason, names in reasons.items() if names}


def _built_in_place(module: nn.Module, tuner_layers: tuple[type, ...]) -> bool:
    """An IA3 layer that is itself the layer (PEFT 0.6), not a wrapper holding it under ``base_layer``."""
    return (isinstance(module, tuner_layers) and "base_layer" not in module._modules
            and type(module).__module__.startswith("peft.tuners.ia3"))


def record_identities(model: nn.Module, folders: Mapping[str, Path]) -> dict[str, Optional[BaseIdentity]]:
    """The identity to record for each adapter (``folders``: adapter -> its saved folder): the base tensors
    its file does not carry. None for all when the model's base is sharded (nothing reliable to record).

    One fingerprint pass for all adapters.

    Example:
        >>> record_identities(nn.Linear(1, 1), {})
        {}
    """
    base = _Base(model)
    if not folders or not all(_materialized(p.tensor) for p in base.found.ordered.values()):
        return {name: None for name in folders}
    left_out, skipped = {}, {}
    for adapter, folder in folders.items():
        weights = find_weights_file(folder)
        left_out[adapter] = _left_out(model, base, adapter, _file_keys(weights) if weights else set())
        skipped[adapter] = {name for names in left_out[adapter].values() for name in names}
    full = live_identity(model, skip=set.intersection(*skipped.values()))
    return {adapter: BaseIdentity({name: record for name, record in full.tensors.items()
                                   if name not in skipped[adapter]}, full.quantization, left_out[adapter])
            for adapter in folders}


def write_identities(model: nn.Module, folder: str) -> list[Path]:
    """Record the base identity of every adapter ``model`` just saved under ``folder``; the files written."""
    folders = adapter_folders(model, folder)
    written = []
    for adapter, identity in record_identities(model, folders).items():
        if identity is not None:
            written.append(write_sidecar(folders[adapter], identity))
    return written
