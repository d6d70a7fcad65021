"""The core: find extra state in a model, name it, validate it, and keep one copy per adapter.

Plain torch. Nothing here knows PEFT or its versions: the patch layer describes the model with a
:class:`ModelView` (where the base model sits, which modules PEFT owns) and calls these functions.

*Extra state* is what PEFT's adapter file leaves out although training changes it:

* **running statistics**: ``running_mean``, ``running_var`` and ``num_batches_tracked`` of every module
  that tracks them (``track_running_stats=True`` and real, initialised running buffers);
* **direct parameters**: base-model ``nn.Parameter`` objects that are trainable at save time and that PEFT
  does not save itself (a ViT ``position_embeddings``, a ``cls_token``, a LayerScale gamma).

Keys are the names the tensor has in the root model's ``state_dict()``.

Per-adapter values (:class:`ExtraStateStore`): the live tensors of the model always hold the values of
one *owner* (an adapter name, or ``None`` for the base model's own values). Switching owner swaps tensor
storage in place (``tensor.data = ...``): modules and tensor objects stay the same, nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from ._errors import ExtraStateMismatch, IncompatibleExtraState

__all__ = [
    "BASE",
    "RUNNING_STAT_NAMES",
    "ExtraStateStore",
    "LoadPlan",
    "ModelView",
    "TensorPlace",
    "find_extra_state",
    "find_running_stats",
    "find_trainable_parameters",
    "plan_load",
    "tracks_running_stats",
]

RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")

#: Owner name of the base model's own values.
BASE = None

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


@dataclass(frozen=True)
class ModelView:
    """How to see the base model inside a root module.

    ``base_prefix`` is the state-dict prefix of the base model inside the root (``"base_model.model."`` for a
    ``PeftModel``). Modules of an ``owned_types`` class are subtrees that PEFT owns entirely
    (``modules_to_save`` wrappers): skipped. Modules of a ``partial_types`` class mix base and adapter state
    (a LoRA layer): only their ``partial_children`` (``base_layer``) are descended into, and their own direct
    parameters count as base parameters. Classes rather than callbacks keep the walk at C speed.

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

    def skip(self, module: nn.Module) -> bool:
        return isinstance(module, self.owned_types)

    def only_children(self, module: nn.Module) -> Optional[tuple[str, ...]]:
        return self.partial_children if isinstance(module, self.partial_types) else None

    def modules(self) -> list[tuple[str, nn.Module]]:
        """``(key_prefix, module)`` for every base-model module outside PEFT's own subtrees, in order."""
        found: list[tuple[str, nn.Module]] = []
        seen: set[int] = set()
        owned, partial, allowed = self.owned_types, self.partial_types, self.partial_children

        def visit(prefix: str, module: nn.Module) -> None:
            if id(module) in seen or isinstance(module, owned):
                return
            seen.add(id(module))
            found.append((prefix, module))
            restrict = isinstance(module, partial)
            for name, child in module._modules.items():
                if child is None or (restrict and name not in allowed):
                    continue
                visit(prefix if name in _TRANSPARENT_SEGMENTS else f"{prefix}{name}.", child)

        visit(self.base_prefix, self.base)
        return found


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor of extra state lives: ``module._buffers[name]`` or ``module._parameters[name]``."""

    key: str
    module: nn.Module
    name: str
    is_parameter: bool

    @property
    def tensor(self) -> torch.Tensor:
        table = self.module._parameters if self.is_parameter else self.module._buffers
        return table[self.name]

    @property
    def kind(self) -> str:
        return "direct parameter" if self.is_parameter else "running statistic"


def find_running_stats(view: ModelView) -> dict[str, TensorPlace]:
    """Every running-statistics buffer of the base model, by state-dict key.

    Example:
        >>> stats = find_running_stats(ModelView(base=nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
        >>> sorted(stats)
        ['1.num_batches_tracked', '1.running_mean', '1.running_var']
    """
    return _running_stats_of(view.modules())


def _running_stats_of(modules: list[tuple[str, nn.Module]]) -> dict[str, TensorPlace]:
    places: dict[str, TensorPlace] = {}
    for prefix, module in modules:
        if not tracks_running_stats(module):
            continue
        buffers = module._buffers
        for name in RUNNING_STAT_NAMES:
            if _is_real(buffers.get(name)):
                key = prefix + name
                places[key] = TensorPlace(key, module, name, False)
    return places


def find_extra_state(view: ModelView) -> tuple[dict[str, TensorPlace], dict[str, TensorPlace]]:
    """``(running statistics, trainable parameters)`` of the base model, from one walk.

    Example:
        >>> stats, trainable = find_extra_state(ModelView(base=nn.Sequential(nn.BatchNorm1d(2))))
        >>> sorted(stats), sorted(trainable)
        (['0.num_batches_tracked', '0.running_mean', '0.running_var'], ['0.bias', '0.weight'])
    """
    modules = view.modules()
    return _running_stats_of(modules), _trainable_parameters_of(modules)


def find_trainable_parameters(view: ModelView) -> dict[str, TensorPlace]:
    """Every base-model parameter with ``requires_grad=True`` outside PEFT's subtrees, by state-dict key.

    A parameter shared by several modules is reported once, under its first name.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> net[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter...
        >>> list(find_trainable_parameters(ModelView(base=net)))
        ['0.bias']
    """
    return _trainable_parameters_of(view.modules())


def _trainable_parameters_of(modules: list[tuple[str, nn.Module]]) -> dict[str, TensorPlace]:
    places: dict[str, TensorPlace] = {}
    seen: set[int] = set()
    for prefix, module in modules:
        for name, param in module._parameters.items():
            if param is None or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            places[f"{prefix}{name}"] = TensorPlace(f"{prefix}{name}", module, name, True)
    return places


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class LoadPlan:
    """What a load will do: which incoming keys are extra state (with their converted values), which are
    left to PEFT, and every mismatch found. Built by :func:`plan_load` without touching the model."""

    extra: dict[str, tuple[TensorPlace, torch.Tensor]] = field(default_factory=dict)
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    mismatches: list[ExtraStateMismatch] = field(default_factory=list)
    dropped: list[ExtraStateMismatch] = field(default_factory=list)


_UNRESOLVED, _PEFT_OWNED = "unresolved", "peft"


def _resolve(view: ModelView, key: str):
    """Map a key to a (module, attribute) of the base model. Returns a tuple, or a status string."""
    if not key.startswith(view.base_prefix):
        return _PEFT_OWNED
    parts = key[len(view.base_prefix) :].split(".")
    module = view.base
    for depth, part in enumerate(parts[:-1]):
        if view.skip(module):
            return _PEFT_OWNED
        only = view.only_children(module)
        if only is not None and part not in only:
            return _PEFT_OWNED
        child = module._modules.get(part)
        while child is None:
            hop = next((s for s in _TRANSPARENT_SEGMENTS if s in module._modules), None)
            if hop is None:
                return (_UNRESOLVED, ".".join(parts[:depth]), part)
            module = module._modules[hop]
            child = module._modules.get(part)
        module = child
    if view.skip(module):
        return _PEFT_OWNED
    return module, parts[-1]


_FIX_SHAPE = (
    "the base model differs from the one the adapter was trained on (was it resized, e.g. another image "
    "size or number of channels?): create it with the same config as in training"
)
_FIX_MISSING = (
    "the base model lacks this module: create it with the same architecture and config as in training"
)
_FIX_NO_STATS = (
    "create the base model with track_running_stats=True for this layer, as in training, or drop the key "
    "from the adapter file"
)
_FIX_DTYPE = "convert the tensor in the adapter file to a dtype of the same kind, or rebuild the base model"


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _classify(view: ModelView, key: str, value, last: str, plan: LoadPlan):
    """Place of a key that is no known running statistic, or None (passed to PEFT or recorded as mismatch)."""
    target = _resolve(view, key)
    if target == _PEFT_OWNED:
        plan.passthrough[key] = value
        return None
    if isinstance(target, tuple) and target[0] == _UNRESOLVED:
        if last in RUNNING_STAT_NAMES:
            parent = (view.base_prefix + target[1]).rstrip(".") or "the base model"
            plan.mismatches.append(
                ExtraStateMismatch(
                    key, "names no module of the base model", f"a module at {key.rsplit('.', 1)[0]}",
                    f"no module {target[2]!r} in {parent}", _FIX_MISSING,
                )
            )
        else:
            plan.passthrough[key] = value
        return None
    module, name = target
    if last in RUNNING_STAT_NAMES:  # names a module, but not one of the running statistics found above
        plan.mismatches.append(
            ExtraStateMismatch(
                key, "the module keeps no running statistics", f"{type(module).__name__} with "
                "track_running_stats=True", f"{type(module).__name__} without running buffers",
                _FIX_NO_STATS,
            )
        )
        return None
    if module._parameters.get(name) is not None:
        return TensorPlace(key, module, name, True)
    plan.passthrough[key] = value
    return None


def plan_load(
    view: ModelView,
    state_dict: Mapping[str, torch.Tensor],
    *,
    claimed_by_peft: Callable[[Mapping[str, torch.Tensor]], set] = lambda candidates: set(),
    ignore_mismatched_sizes: bool = False,
) -> LoadPlan:
    """Sort an incoming adapter state dict into extra state and PEFT's own keys, and validate the extra state.

    A key is extra state when it names a running statistic of the base model, or a base-model parameter
    that PEFT does not claim: ``claimed_by_peft`` gets the live parameters named by the file (key ->
    tensor) in one call and returns the keys PEFT saves itself. A key that ends in a running-statistic name but names
    no module, or a module without statistics, is a mismatch; so is any shape that differs, or a dtype of
    another kind (float vs integer). Converted values take the device and dtype of the model's tensors.
    With ``ignore_mismatched_sizes``, shape mismatches are dropped (reported in ``plan.dropped``) instead.

    Example:
        >>> view = ModelView(base=nn.BatchNorm1d(2))
        >>> plan = plan_load(view, {"running_mean": torch.ones(2), "lora_A.weight": torch.ones(1)})
        >>> sorted(plan.extra), sorted(plan.passthrough)
        (['running_mean'], ['lora_A.weight'])
    """
    plan = LoadPlan()
    stats_index = find_running_stats(view)  # one walk; most extra-state keys are found here in O(1)
    candidates: list[tuple[str, TensorPlace, torch.Tensor]] = []
    for key, value in state_dict.items():
        place = stats_index.get(key)
        if place is None:
            place = _classify(view, key, value, key[key.rfind(".") + 1 :], plan)
            if place is None:
                continue
        candidates.append((key, place, value))
    params = {key: place.tensor for key, place, _ in candidates if place.is_parameter}
    claimed = claimed_by_peft(params) if params else set()
    for key, place, value in candidates:
        if key in claimed:
            plan.passthrough[key] = value
            continue
        live = place.tensor
        if value.shape != live.shape:
            mismatch = ExtraStateMismatch(
                key, f"{place.kind} has another shape", f"shape {tuple(live.shape)} (the model's)",
                f"shape {tuple(value.shape)} (the file's)", _FIX_SHAPE,
            )
            (plan.dropped if ignore_mismatched_sizes else plan.mismatches).append(mismatch)
            continue
        if value.dtype != live.dtype and _dtype_kind(value.dtype) != _dtype_kind(live.dtype):
            plan.mismatches.append(
                ExtraStateMismatch(
                    key, f"{place.kind} has a dtype of another kind", f"a {_dtype_kind(live.dtype)} dtype "
                    f"like the model's {live.dtype}", f"{value.dtype}", _FIX_DTYPE,
                )
            )
            continue
        if live.device.type != "meta" and (value.device != live.device or value.dtype != live.dtype):
            value = value.to(device=live.device, dtype=live.dtype)
        plan.extra[key] = (place, value)
    return plan


def raise_for_mismatches(plan: LoadPlan, adapter_name: str) -> None:
    """Raise :class:`IncompatibleExtraState` when the plan found any mismatch."""
    if plan.mismatches:
        raise IncompatibleExtraState(adapter_name, plan.mismatches)


# ------------------------------------------------------------------------------------ per-adapter store


class ExtraStateStore:
    """One value per owner (adapter name, or :data:`BASE`) for every managed key of one model.

    Invariant: for each managed key the live tensor holds the value of ``source(live, key)``; every other
    source that has a value for the key holds it in ``stored``. An owner without its own value for a key
    computes with the base model's value (``source(owner, key) is BASE``).

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> store = ExtraStateStore(live="a")
        >>> place = TensorPlace("running_mean", bn, "running_mean", False)
        >>> store.set_values("b", {"running_mean": (place, torch.ones(2))})
        >>> store.switch("b"); bn.running_mean.tolist()
        [1.0, 1.0]
        >>> store.switch("a"); bn.running_mean.tolist()
        [0.0, 0.0]
    """

    def __init__(self, live: Optional[str] = BASE, view: Optional[ModelView] = None):
        self.live: Optional[str] = live
        self.view = view
        self.places: Dict[str, TensorPlace] = {}
        self.owned: Dict[Optional[str], set[str]] = {}
        self.stored: Dict[Optional[str], Dict[str, torch.Tensor]] = {BASE: {}}
        self.trainable: Dict[Optional[str], Dict[str, bool]] = {}
        self._stat_keys: Optional[frozenset[str]] = None
        self._owns_all_stats: set[Optional[str]] = set()  # owners known to own every running statistic

    @property
    def stat_keys(self) -> frozenset[str]:
        """Keys of the view's running statistics, found once, when first needed (not at attach time)."""
        if self._stat_keys is None:
            self._stat_keys = frozenset(find_running_stats(self.view)) if self.view is not None else frozenset()
        return self._stat_keys

    # -- queries
    def source(self, owner: Optional[str], key: str) -> Optional[str]:
        if owner is not BASE and key in self.owned.get(owner, ()):
            return owner
        return BASE

    def value(self, owner: Optional[str], key: str) -> torch.Tensor:
        """The value ``owner`` computes with for ``key`` (live tensor or stored copy)."""
        src = self.source(owner, key)
        if src == self.source(self.live, key):
            return self.places[key].tensor.detach()
        return self.stored[src][key]

    def owned_keys(self, owner: Optional[str]) -> set[str]:
        return set(self.owned.get(owner, ()))

    def live_owns_stats(self) -> bool:
        """True when the live owner has its own value for every running statistic (checked per forward)."""
        live = self.live
        if live is BASE or live in self._owns_all_stats:
            return True
        if self.stat_keys <= self.owned.get(live, set()):
            self._owns_all_stats.add(live)
            return True
        return False

    # -- changes
    def _manage(self, place: TensorPlace) -> None:
        if place.key not in self.places:
            self.places[place.key] = place

    def claim_live(self, places: Mapping[str, TensorPlace], trainable: Optional[bool] = None) -> None:
        """The live owner takes the live values of ``places`` as its own; the base keeps a copy.

        Used when training changes tensors in place: the values the base model had are saved first.
        """
        if self.live is BASE:
            return
        owned = self.owned.setdefault(self.live, set())
        for key, place in places.items():
            self._manage(place)
            if key not in owned:
                self.stored[BASE][key] = place.tensor.detach().clone()
                owned.add(key)
            if trainable is not None and place.is_parameter:
                self.trainable.setdefault(self.live, {})[key] = trainable

    def set_values(
        self, owner: str, values: Mapping[str, tuple[TensorPlace, torch.Tensor]], trainable: bool = False
    ) -> None:
        """Record ``owner``'s values; when ``owner`` is live they go into the model at once."""
        owned = self.owned.setdefault(owner, set())
        flags = self.trainable.setdefault(owner, {})
        for key, (place, tensor) in values.items():
            self._manage(place)
            if place.is_parameter:
                flags[key] = trainable
            if owner != self.live:
                self.stored.setdefault(owner, {})[key] = tensor
                owned.add(key)
                continue
            live = place.tensor
            if key not in owned:  # the live storage is the base model's value: keep it
                self.stored[BASE][key] = live.data
                owned.add(key)
            live.data = tensor
            if place.is_parameter:
                live.requires_grad_(trainable)

    def switch(self, target: Optional[str]) -> None:
        """Make ``target``'s values live (``BASE`` for the base model's own), swapping storage in place."""
        if target == self.live:
            return
        for key, place in self.places.items():
            old, new = self.source(self.live, key), self.source(target, key)
            if old == new:
                continue
            live = place.tensor
            self.stored.setdefault(old, {})[key] = live.data
            live.data = self.stored[new].pop(key)
            if place.is_parameter:
                live.requires_grad_(self.trainable.get(new, {}).get(key, False))
        self.live = target

    def forget(self, owner: str) -> None:
        """Drop everything stored for ``owner`` (after ``delete_adapter``). ``owner`` must not be live."""
        if owner == self.live:
            raise RuntimeError(f"cannot forget the live owner {owner!r}: switch away first")
        self.owned.pop(owner, None)
        self.stored.pop(owner, None)
        self.trainable.pop(owner, None)
        self._owns_all_stats.discard(owner)
