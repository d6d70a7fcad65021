"""The core, part 3: one value per adapter for every tensor of extra state, and what training changed.

Plain torch. The rule: **an adapter owns every base-model tensor that changed while it was live** (and every
tensor its file carried). Everything else computes with the base model's own value.

* **Buffers** (every persistent buffer: running statistics, spectral-norm vectors, a router bias, observers):
  a copy of each is kept when the store attaches (:meth:`ExtraStateStore.capture`); a change is found by
  comparing bytes, so no entry point (``forward``, ``forward_features``, a submodule, ``functional_call``)
  can be missed.
* **Parameters**: copying every base weight would double a large model's memory, so a parameter's base value
  is copied the first time an optimizer is about to step it (a global optimizer step pre-hook,
  :func:`install_optimizer_hook`). A parameter changed in place by other means is found by its version
  counter (its base value is then unknown: see :attr:`ExtraStateStore.unknown_base`).

:meth:`ExtraStateStore.settle` attributes every change since the last call to the live owner (or, when the
base model is live, records it in :attr:`ExtraStateStore.unattributed` for a warning at save time).

The live tensors always hold the values of one *owner* (an adapter name, or :data:`BASE`). Switching owner
swaps tensor storage in place (``tensor.data = ...``): modules and tensor objects stay the same.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch

from ._state import BASE, BaseTensors, ModelView, TensorPlace

__all__ = ["ExtraStateStore", "install_optimizer_hook", "remove_optimizer_hook", "same_bytes"]


def same_bytes(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """For each ``(a, b)``: True when both hold exactly the same bits (NaN == NaN; shape and dtype must match).

    On the CPU each pair is compared directly; on an accelerator all pairs of one device are compared with
    one concatenation and one host sync, not one sync per tensor.

    Example:
        >>> same_bytes([(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")])),
        ...             (torch.zeros(2), torch.ones(2))])
        [True, False]
    """
    result = [False] * len(pairs)
    groups: Dict[torch.device, list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            continue
        if a.numel() == 0:
            result[i] = True
        elif a.device.type == "cpu":
            result[i] = bool(torch.equal(_as_bytes(a), _as_bytes(b)))
        else:
            groups.setdefault(a.device, []).append(i)
    for device, indices in groups.items():
        lefts = [_as_bytes(pairs[i][0]) for i in indices]
        sizes = tuple(t.numel() for t in lefts)
        differs = (torch.cat(lefts) != torch.cat([_as_bytes(pairs[i][1]) for i in indices])).to(torch.int32)
        counts = torch.zeros(len(indices), dtype=torch.int32, device=device)
        counts.index_add_(0, _segment_ids(device, sizes), differs)
        for i, n in zip(indices, counts.tolist()):
            result[i] = n == 0
    return result


_SEGMENTS: Dict[tuple, torch.Tensor] = {}


def _segment_ids(device: torch.device, sizes: tuple[int, ...]) -> torch.Tensor:
    """``[0]*sizes[0] + [1]*sizes[1] + ...`` on ``device``, kept for the next call with the same layout."""
    key = (device, sizes)
    ids = _SEGMENTS.get(key)
    if ids is None:
        if len(_SEGMENTS) > 8:
            _SEGMENTS.clear()
        counts = torch.tensor(sizes, device=device)
        ids = _SEGMENTS[key] = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
    return ids


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # A flat uint8 view (one view op when contiguous): bitwise, so NaN == NaN and -0.0 != 0.0.
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.view(-1).view(torch.uint8)


class ExtraStateStore:
    """One value per owner (adapter name, or :data:`BASE`) for every tensor of extra state of one model.

    Invariant: for each managed key the live tensor holds the value of ``source(live, key)``; every other
    source that has a value for the key holds it in ``stored``. An owner without its own value for a key
    computes with the base model's value (``source(owner, key) is BASE``). ``reference`` holds the base
    value of every tracked tensor, never live: it is what changes are found against.

    Example:
        >>> from torch import nn
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
        self.reference: Dict[str, torch.Tensor] = {}
        self.versions: Dict[str, tuple[int, int]] = {}  # parameter key -> (id, version) when last seen unchanged
        self.unattributed: Dict[str, str] = {}  # key -> why no adapter could own its change
        self.unknown_base: set[str] = set()  # parameters claimed before their base value was known
        self.warned: set[str] = set()
        self.disabled_depth = 0
        self._lock = threading.RLock()

    # -- capture
    def capture(self, found: BaseTensors) -> None:
        """Take the base values: a copy of every buffer, the version of every parameter (at attach)."""
        with self._lock:
            self.reference.update(_copies({k: p.tensor for k, p in found.buffers.items() if k not in self.reference}))
            for key, place in found.parameters.items():
                tensor = place.tensor
                self.versions.setdefault(key, (id(tensor), tensor._version))
            _index_parameters(self, found.parameters)

    def capture_parameter(self, key: str, param: torch.Tensor) -> None:
        """Keep ``param``'s value as its base value, unless one is known (called before an optimizer step)."""
        with self._lock:
            if key not in self.reference and key not in self.owned.get(self.live, ()):
                self.reference[key] = param.detach().clone()

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

    # -- finding changes
    def settle(self, found: BaseTensors, peft_keys: Callable[[Mapping[str, torch.Tensor]], set] = lambda c: set()):
        """Attribute every tensor that changed since the base values were taken to the live owner.

        ``found`` is a fresh walk of the model; ``peft_keys`` gets candidate parameters (base key -> tensor)
        and returns the keys PEFT saves itself (those are PEFT's, not extra state). Returns the keys claimed.
        """
        with self._lock:
            live = self.live
            own = self.owned.get(live, set()) if live is not BASE else set()
            changed: dict[str, TensorPlace] = {}
            pairs, keys = [], []
            for table in (found.buffers, found.parameters):
                for key, place in table.items():
                    if key in own:
                        continue
                    ref = self.reference.get(key)
                    if ref is None:
                        if table is found.buffers:  # a buffer created after attach: its first value is its base
                            self.reference[key] = place.tensor.detach().clone()
                        elif self._version_changed(key, place.tensor):
                            changed[key] = place
                        continue
                    live_tensor = place.tensor.detach()
                    if ref.dtype != live_tensor.dtype or ref.device != live_tensor.device:
                        ref = self._recast_reference(key, live_tensor)
                    pairs.append((live_tensor, ref))
                    keys.append((key, place))
            for (key, place), same in zip(keys, same_bytes(pairs)):
                if not same:
                    changed[key] = place
            params = {k: p.tensor for k, p in changed.items() if p.is_parameter}
            if params:
                for key in peft_keys(params):
                    changed.pop(key, None)
            if live is BASE:
                for key, place in changed.items():
                    self.unattributed[key] = "changed while no adapter was active (inside disable_adapter())"
                    self._rebase(key, place)
                return set()
            self.claim(changed)
            return set(changed)

    def _version_changed(self, key: str, tensor: torch.Tensor) -> bool:
        seen = self.versions.get(key)
        now = (id(tensor), tensor._version)
        if seen is None or seen == now:
            self.versions[key] = now
            return False
        if seen[0] != id(tensor) and not tensor.requires_grad:
            self.versions[key] = now  # replaced, not trained (quantized, sharded or re-created): a new baseline
            return False
        return True

    def _recast_reference(self, key: str, live: torch.Tensor) -> torch.Tensor:
        # The model was cast or moved after the base values were taken: compare in the new dtype and device.
        ref = self.reference[key].to(device=live.device, dtype=live.dtype)
        self.reference[key] = ref
        return ref

    def _rebase(self, key: str, place: TensorPlace) -> None:
        tensor = place.tensor
        if key in self.reference:
            self.reference[key] = tensor.detach().clone()
        self.versions[key] = (id(tensor), tensor._version)

    # -- changes
    def claim(self, places: Mapping[str, TensorPlace], trainable: bool = True) -> None:
        """The live owner takes the live values of ``places`` as its own; the base keeps its base value."""
        if self.live is BASE or not places:
            return
        with self._lock:
            owned = self.owned.setdefault(self.live, set())
            for key, place in places.items():
                self.places.setdefault(key, place)
                if key in owned:
                    continue
                ref = self.reference.get(key)
                if ref is None:  # changed in place outside an optimizer before its base value was known
                    self.unknown_base.add(key)
                    ref = place.tensor.detach()
                self.stored[BASE][key] = ref.clone()
                owned.add(key)
                if place.is_parameter:
                    self.trainable.setdefault(self.live, {})[key] = trainable and place.tensor.requires_grad

    def set_values(
        self, owner: str, values: Mapping[str, tuple[TensorPlace, torch.Tensor]], trainable: bool = False
    ) -> None:
        """Record ``owner``'s values (from its file); when ``owner`` is live they go into the model at once."""
        with self._lock:
            owned = self.owned.setdefault(owner, set())
            flags = self.trainable.setdefault(owner, {})
            for key, (place, tensor) in values.items():
                self.places.setdefault(key, place)
                if place.is_parameter:
                    flags[key] = trainable
                    if key not in self.reference and self.source(self.live, key) is BASE:
                        self.reference[key] = place.tensor.detach().clone()  # the base value, before any file's
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
        with self._lock:
            for key, place in self.places.items():
                old, new = self.source(self.live, key), self.source(target, key)
                if old == new:
                    continue
                live = place.tensor
                self.stored.setdefault(old, {})[key] = live.data
                live.data = self.stored[new].pop(key)
                if place.is_parameter:
                    live.requires_grad_(self.trainable.get(new, {}).get(key, False))
                    self.versions[key] = (id(live), live._version)
            self.live = target

    def forget(self, owner: str) -> None:
        """Drop everything stored for ``owner`` (after ``delete_adapter``). ``owner`` must not be live."""
        if owner == self.live:
            raise RuntimeError(f"cannot forget the live owner {owner!r}: switch away first")
        with self._lock:
            self.owned.pop(owner, None)
            self.stored.pop(owner, None)
            self.trainable.pop(owner, None)

    # -- atomic loads (see _transaction.py): everything a failed load may have changed, put back
    def __peft_buffers_snapshot__(self) -> Callable[[], None]:
        """A closure that restores this store and the live tensors it manages to their state now."""
        with self._lock:
            state = {name: _copy_nested(value) for name, value in vars(self).items() if name != "_lock"}
            live_data = {key: (place, place.tensor.data, place.tensor.requires_grad)
                         for key, place in self.places.items()}

        def restore() -> None:
            with self._lock:
                for name in [n for n in vars(self) if n != "_lock"]:
                    if name not in state:
                        delattr(self, name)
                vars(self).update(state)
                for place, data, requires_grad in live_data.values():
                    tensor = place.tensor
                    tensor.data = data
                    if place.is_parameter:
                        tensor.requires_grad_(requires_grad)

        return restore

    def __getstate__(self) -> dict:  # picklable with the model (torch.save(model)); locks are not
        state = dict(vars(self))
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> ExtraStateStore:
        import copy

        clone = ExtraStateStore.__new__(ExtraStateStore)
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone


def _copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent copies of ``tensors``: one concatenation per device and dtype (not one copy kernel each),
    returned as views into it."""
    groups: Dict[tuple, list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault((tensor.device, tensor.dtype), []).append(key)
    copies: dict[str, torch.Tensor] = {}
    for keys in groups.values():
        parts = [tensors[k].detach() for k in keys]
        if len(parts) == 1:
            copies[keys[0]] = parts[0].clone()
            continue
        flat = torch.cat([t.reshape(-1) for t in parts])
        for key, part, piece in zip(keys, parts, flat.split([t.numel() for t in parts])):
            copies[key] = piece.view(part.shape)
    return copies


def _copy_nested(value):
    if isinstance(value, dict):
        return {k: _copy_nested(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    return value


# ------------------------------------------------------------------------ base values of trained parameters

_index_lock = threading.Lock()
# id(parameter) -> (weak store, base key, weak parameter): which store to tell before an optimizer steps it.
# Bounded by the parameters alive: an entry leaves when its parameter is freed (the weak reference's callback)
# or, at the next indexing, when its store is gone; nothing here keeps a model alive.
_PARAMETER_INDEX: Dict[int, tuple[weakref.ref, str, weakref.ref]] = {}
_checked: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple] = weakref.WeakKeyDictionary()
_hook_handle = None
_swept_at = 0  # size of the index after its last sweep for entries of dead stores


class _ParameterRef(weakref.ref):
    """A weak reference to an indexed parameter that knows its index entry (for :func:`_forget_parameter`)."""

    __slots__ = ("entry_id",)


def _forget_parameter(ref: _ParameterRef) -> None:
    """Weak-reference callback: the parameter is being freed, its entry goes (no lock: a collection may run
    this while the same thread holds the index lock; one dict lookup and pop are atomic)."""
    entry = _PARAMETER_INDEX.get(ref.entry_id)
    if entry is not None and entry[2] is ref:
        _PARAMETER_INDEX.pop(ref.entry_id, None)


def _index_parameters(store: ExtraStateStore, parameters: Mapping[str, TensorPlace]) -> None:
    global _swept_at
    ref = weakref.ref(store)
    with _index_lock:
        for key, place in parameters.items():
            tensor = place.tensor
            entry = _PARAMETER_INDEX.get(id(tensor))
            if entry is not None and entry[0] is ref and entry[1] == key and entry[2]() is tensor:
                continue  # already indexed (a second attach of the same store)
            tensor_ref = _ParameterRef(tensor, _forget_parameter)
            tensor_ref.entry_id = id(tensor)
            _PARAMETER_INDEX[id(tensor)] = (ref, key, tensor_ref)
        if len(_PARAMETER_INDEX) > 2 * _swept_at + 64:  # amortised: entries of stores that are gone
            for entry_id, entry in _PARAMETER_INDEX.copy().items():  # a copy: callbacks may pop meanwhile
                if entry[0]() is None and _PARAMETER_INDEX.get(entry_id) is entry:
                    _PARAMETER_INDEX.pop(entry_id, None)
            _swept_at = len(_PARAMETER_INDEX)
        _checked.clear()


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    groups = optimizer.param_groups
    # Only a trainable parameter can be stepped: an optimizer given model.parameters() holds every frozen base
    # weight too, and copying those would double the model's memory (and take PEFT's merges for training).
    signature = tuple((len(g["params"]), sum(1 for p in g["params"] if p.requires_grad)) for g in groups)
    if _checked.get(optimizer) == signature:
        return
    for param in _parameters_of(groups):
        if not param.requires_grad:
            continue
        entry = _PARAMETER_INDEX.get(id(param))
        if entry is None or entry[2]() is not param:
            continue
        store = entry[0]()
        if store is not None:
            store.capture_parameter(entry[1], param)
    _checked[optimizer] = signature


def _parameters_of(groups: Iterable[dict]) -> Iterable[torch.Tensor]:
    for group in groups:
        yield from group["params"]


def install_optimizer_hook() -> None:
    """Register the global optimizer step pre-hook that keeps trained parameters' base values. Idempotent.

    Example:
        >>> install_optimizer_hook(); remove_optimizer_hook()
    """
    global _hook_handle
    with _index_lock:
        if _hook_handle is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            _hook_handle = register_optimizer_step_pre_hook(_before_optimizer_step)


def remove_optimizer_hook() -> None:
    """Remove the hook :func:`install_optimizer_hook` registered. Idempotent.

    Example:
        >>> remove_optimizer_hook()
    """
    global _hook_handle
    with _index_lock:
        if _hook_handle is not None:
            _hook_handle.remove()
            _hook_handle = None
            _checked.clear()
