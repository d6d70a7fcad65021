"""The core, part 1: see the base model inside a root module, find its tensors, name them.

Plain torch. Nothing here knows PEFT or its versions: the patch layer describes the model with a
:class:`ModelView` (where the base model sits, which wrapper classes PEFT puts around base modules) and calls
these functions. Part 2 (:mod:`._load_plan`) validates incoming files; part 3 (:mod:`._store`) keeps one value
per adapter and finds what training changed.

*Extra state* is what PEFT's adapter file leaves out although training changes it: every persistent buffer of
the base model (running statistics, spectral-norm vectors, a router bias, quantization observers) and every
base-model parameter. Which of them a file carries is decided by :mod:`._store`: those that changed.

Every tensor has two names:

* its **live key**, the name it has in the root model's ``state_dict()`` now (with ``base_layer.`` where a tuner
  layer wraps its module, ``original_module.`` inside a ``modules_to_save`` wrapper);
* its **base key**, the name it has in the base model without any adapter (those segments left out). Other
  adapters add and remove wrappers; the base key stays, so the per-adapter store is keyed by it;
* its **saved key**, the name an adapter file gives it: the live key without ``original_module.`` (a
  ``modules_to_save`` wrapper another adapter added is not part of the base model's names), keeping
  ``base_layer.`` as PEFT's own keys do, so stock PEFT loads the file for a single adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = [
    "BASE",
    "RUNNING_STAT_NAMES",
    "BaseTensors",
    "ModelView",
    "TensorPlace",
    "find_base_tensors",
    "find_running_stats",
    "find_trainable_parameters",
    "is_running_stat",
    "tracks_running_stats",
]

RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")

#: Owner name of the base model's own values.
BASE = None

#: What :meth:`ModelView.kind` says a module is: part of the base model, a tuner layer, a modules_to_save wrapper.
PLAIN, PARTIAL, OWNED = "plain", "partial", "owned"
_KINDS: dict[tuple, dict[type, str]] = {}  # (owned_types, partial_types) -> class -> kind

# Wrapper modules whose name torch leaves out of state-dict keys (FSDP, activation checkpointing).
_TRANSPARENT_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def tracks_running_stats(module: nn.Module) -> bool:
    """True when ``module`` keeps running statistics that train mode updates.

    Duck-typed, so BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with ``track_running_stats=True``,
    initialised lazy variants and third-party look-alikes all count.

    Example:
        >>> tracks_running_stats(nn.BatchNorm2d(4)), tracks_running_stats(nn.GroupNorm(2, 4))
        (True, False)
    """
    if getattr(module, "track_running_stats", False) is not True:
        return False
    buffers = module._buffers
    return _is_real(buffers.get("running_mean")) or _is_real(buffers.get("running_var"))


def _is_real(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.parameter.UninitializedTensorMixin)


class TensorPlace:
    """Where a tensor of the base model lives: ``module._buffers[name]`` or ``module._parameters[name]``.

    ``key`` is the base key (stable while adapters add wrappers), ``live_key`` the state-dict name now,
    ``saved_key`` the name an adapter file gives it. A plain slotted class: the walk makes one per tensor
    at every save and switch, so construction must be cheap.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> TensorPlace("bn.running_mean", bn, "running_mean", False).kind
        'running statistic'
    """

    __slots__ = ("key", "module", "name", "is_parameter", "live_key", "saved_as")

    def __init__(self, key: str, module: nn.Module, name: str, is_parameter: bool, live_key: str = "",
                 saved_as: str = ""):
        self.key, self.module, self.name, self.is_parameter = key, module, name, is_parameter
        self.live_key, self.saved_as = live_key, saved_as

    def __repr__(self) -> str:
        return f"TensorPlace({self.key!r}, {type(self.module).__name__}, {self.name!r}, {self.is_parameter})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorPlace):
            return NotImplemented
        return (self.key, self.module, self.name, self.is_parameter) == (
            other.key, other.module, other.name, other.is_parameter)

    def __hash__(self) -> int:
        return hash((self.key, id(self.module), self.name))

    @property
    def tensor(self) -> torch.Tensor:
        table = self.module._parameters if self.is_parameter else self.module._buffers
        return table[self.name]

    @property
    def kind(self) -> str:
        if self.is_parameter:
            return "direct parameter"
        return "running statistic" if is_running_stat(self) else "buffer"

    @property
    def saved_key(self) -> str:
        return self.saved_as or self.live_key or self.key


def is_running_stat(place: TensorPlace) -> bool:
    """True for a running-statistics buffer of a module that tracks them.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> is_running_stat(TensorPlace("running_var", bn, "running_var", False))
        True
    """
    return not place.is_parameter and place.name in RUNNING_STAT_NAMES and tracks_running_stats(place.module)


@dataclass(frozen=True)
class ModelView:
    """How to see the base model inside a root module.

    ``base_prefix`` is the state-dict prefix of the base model inside the root (``"base_model.model."`` for a
    ``PeftModel``). A module of a ``partial_types`` class (a tuner layer) mixes base and adapter state: only
    its ``partial_children`` (``base_layer``) belong to the base model, and its own direct tensors count as
    base tensors. A module of an ``owned_types`` class (a ``modules_to_save`` wrapper) holds copies PEFT saves
    itself; only its ``owned_children`` (``original_module``, the base module it wraps) belong to the base
    model. Both segments are left out of base keys. Classes rather than callbacks keep the walk at C speed.

    Example:
        >>> view = ModelView(base=nn.Sequential(nn.BatchNorm1d(3)))
        >>> list(find_running_stats(view))
        ['0.running_mean', '0.running_var', '0.num_batches_tracked']
    """

    base: nn.Module
    base_prefix: str = ""
    owned_types: tuple[type, ...] = ()
    partial_types: tuple[type, ...] = ()
    partial_children: tuple[str, ...] = ("base_layer",)
    owned_children: tuple[str, ...] = ("original_module",)

    def kind(self, module: nn.Module) -> int:
        """:data:`PLAIN`, :data:`PARTIAL` (a tuner layer) or :data:`OWNED` (a ``modules_to_save`` wrapper).

        Decided once per class (``isinstance`` on PEFT's abstract classes is slow, and a walk asks per module).
        """
        kinds = _KINDS.setdefault((self.owned_types, self.partial_types), {})
        cls = type(module)
        kind = kinds.get(cls)
        if kind is None:
            kind = kinds[cls] = (PARTIAL if issubclass(cls, self.partial_types) else
                                 OWNED if issubclass(cls, self.owned_types) else PLAIN)
        return kind

    def wrapper_children(self, module: nn.Module) -> Optional[tuple[str, ...]]:
        """The children of ``module`` that belong to the base model, when ``module`` is a PEFT wrapper."""
        kind = self.kind(module)
        return None if kind is PLAIN else self.partial_children if kind is PARTIAL else self.owned_children

    def walk(self) -> tuple[list[tuple[str, str, str, nn.Module]], set[str]]:
        """Every base-model module as :meth:`modules` gives it, and the live prefixes of what adapters own.

        The second item holds ``"<live path of a wrapper>.<child>."`` for every child of a tuner layer or
        ``modules_to_save`` wrapper that is not the base module it wraps (``lora_A.``, ``modules_to_save.``):
        a state-dict key under one of them is PEFT's, which :func:`~._load_plan.plan_load` tells in O(1).
        """
        found: list[tuple[str, str, str, nn.Module]] = []
        adapter_prefixes: set[str] = set()
        seen: set[int] = set()
        kind_of = self.kind
        partial_children, owned_children = self.partial_children, self.owned_children

        # Depth first, children in order, each module once (at its first place). A loop, not a recursive
        # closure: that would refer to itself and keep every module alive until the garbage collector runs.
        stack = [(self.base_prefix, self.base_prefix, self.base_prefix, self.base)]
        while stack:
            live, saved, canon, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            kind = kind_of(module)
            if kind is not OWNED:  # an owned wrapper's own tensors are PEFT's
                found.append((live, saved, canon, module))
            children = []
            if kind is PLAIN:
                for name, child in module._modules.items():
                    if child is None:
                        continue
                    if name in _TRANSPARENT_SEGMENTS:
                        children.append((live, saved, canon, child))
                    else:
                        children.append((f"{live}{name}.", f"{saved}{name}.", f"{canon}{name}.", child))
            else:
                allowed = owned_children if kind is OWNED else partial_children
                for name, child in module._modules.items():
                    if child is None:
                        continue
                    if name in allowed:
                        children.append((f"{live}{name}.", saved if kind is OWNED else f"{saved}{name}.", canon,
                                         child))
                    else:
                        adapter_prefixes.add(f"{live}{name}.")
            stack.extend(reversed(children))
        return found, adapter_prefixes

    def modules(self) -> list[tuple[str, str, str, nn.Module]]:
        """``(live prefix, saved prefix, base prefix, module)`` for every base-model module, in order, each once."""
        return self.walk()[0]


@dataclass
class BaseTensors:
    """Every persistent buffer and every parameter of the base model, by base key (see :func:`find_base_tensors`)."""

    buffers: dict[str, TensorPlace]
    parameters: dict[str, TensorPlace]
    ordered: dict[str, TensorPlace]  # both, in state-dict order
    adapter_prefixes: frozenset = frozenset()  # see ModelView.walk

    def get(self, key: str) -> Optional[TensorPlace]:
        return self.ordered.get(key)


def find_base_tensors(view: ModelView) -> BaseTensors:
    """Every persistent buffer and every parameter of the base model outside PEFT's copies, from one walk.

    Non-persistent buffers are left out (they are not in ``state_dict()``); a tensor shared by several modules
    is reported once, under its first name.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> found = find_base_tensors(ModelView(base=net, base_prefix="m."))
        >>> sorted(found.buffers), sorted(found.parameters)  # doctest: +NORMALIZE_WHITESPACE
        (['m.1.num_batches_tracked', 'm.1.running_mean', 'm.1.running_var'],
         ['m.0.bias', 'm.0.weight', 'm.1.bias', 'm.1.weight'])
    """
    buffers: dict[str, TensorPlace] = {}
    parameters: dict[str, TensorPlace] = {}
    ordered: dict[str, TensorPlace] = {}
    seen: set[int] = set()
    modules, adapter_prefixes = view.walk()
    plain = torch.Tensor
    for live, saved, canon, module in modules:
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            key = canon + name
            parameters[key] = ordered[key] = TensorPlace(key, module, name, True, live + name, saved + name)
        buffer_table = module._buffers
        if not buffer_table:
            continue
        skip = module._non_persistent_buffers_set
        for name, buf in buffer_table.items():
            if buf is None or name in skip or (type(buf) is not plain and not _is_real(buf)) or id(buf) in seen:
                continue
            seen.add(id(buf))
            key = canon + name
            buffers[key] = ordered[key] = TensorPlace(key, module, name, False, live + name, saved + name)
    return BaseTensors(buffers, parameters, ordered, frozenset(adapter_prefixes))


def find_running_stats(view: ModelView) -> dict[str, TensorPlace]:
    """Every running-statistics buffer of the base model, by base key.

    Example:
        >>> stats = find_running_stats(ModelView(base=nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
        >>> sorted(stats)
        ['1.num_batches_tracked', '1.running_mean', '1.running_var']
    """
    return {key: place for key, place in find_base_tensors(view).buffers.items() if is_running_stat(place)}


def find_trainable_parameters(view: ModelView) -> dict[str, TensorPlace]:
    """Every base-model parameter with ``requires_grad=True`` outside PEFT's copies, by base key.

    A parameter shared by several modules is reported once, under its first name.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> net[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter...
        >>> list(find_trainable_parameters(ModelView(base=net)))
        ['0.bias']
    """
    return {k: p for k, p in find_base_tensors(view).parameters.items() if p.tensor.requires_grad}
