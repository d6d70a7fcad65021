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

from ._copies import _changed_in_group, _flat_copies, _Slot, same_bytes
from ._state import BASE, BaseTensors, ModelView, TensorPlace, find_base_tensors

__all__ = ["ExtraStateStore", "install_optimizer_hook", "remove_optimizer_hook"]


_TRANSIENT = ("_lock", "_segments")  # store attributes that are not state: never snapshotted nor pickled


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
        self.disabled_depth = 0  # open disable contexts: the base model's values are live inside them
        self.layers_disabled = False  # the adapter layers were switched off (the method form of disabling)
        self.unloaded = False  # the adapters were removed from the model: the base model's values stay live
        self.joint: tuple[str, ...] = ()  # other owners active together with ``live`` (their state is not live)
        self.joint_changes: Dict[str, tuple[str, ...]] = {}  # key -> every owner active when it changed
        self._unshared: set[str] = set()  # joint changes not yet copied to the other owners of the group
        self._lock = threading.RLock()
        self._segments: dict = {}  # same_bytes' layouts (a cache: never snapshotted or pickled)

    # -- capture
    def capture(self, found: BaseTensors) -> None:
        """Take the base values: a copy of every buffer, the version of every parameter (at attach).

        The buffers are copied with one concatenation per device and dtype and kept there (:class:`_Slot`):
        no tensor object per buffer until one is asked for, and :meth:`settle` compares a whole group at once.
        A buffer some adapter already owns is skipped: its base value is the one kept for :data:`BASE`.
        """
        with self._lock:
            owned = set().union(*self.owned.values()) if self.owned else set()
            self.reference.update(_flat_copies({k: p.tensor for k, p in found.buffers.items()
                                                if k not in self.reference and k not in owned}))
            for key, place in found.parameters.items():
                tensor = place.tensor
                self.versions.setdefault(key, _version_of(tensor))
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

    def base_value(self, key: str) -> Optional[torch.Tensor]:
        """The base value of ``key`` peft_buffers knows (a copy taken at attach or before the first optimizer
        step), or None when none was taken (a parameter never stepped: its live value is its base value)."""
        ref = self.reference.get(key)
        if type(ref) is _Slot:
            ref = self.reference[key] = ref.tensor()
        return ref

    # -- finding changes
    def settle(self, found: BaseTensors, peft_keys: Callable[[Mapping[str, torch.Tensor]], set] = lambda c: set()):
        """Attribute every tensor that changed since the base values were taken to the live owner.

        ``found`` is a fresh walk of the model; ``peft_keys`` gets candidate parameters (base key -> tensor)
        and returns the keys PEFT saves itself (those are PEFT's, not extra state). Returns the keys claimed.
        """
        with self._lock:
            if getattr(self, "_adopt_pending", False):
                self._adopt(found)
            live = self.live
            own = self.owned.get(live, set()) if live is not BASE else set()
            changed: dict[str, TensorPlace] = {}
            pairs, keys = [], []
            groups: dict[int, list] = {}  # id(flat) -> [(key, place, slot)]: compared a group at a time
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
                    if type(ref) is _Slot and ref.fits(live_tensor):
                        groups.setdefault(id(ref.flat), []).append((key, place, ref))
                        continue
                    ref = self.base_value(key)
                    if ref.dtype != live_tensor.dtype or ref.device != live_tensor.device:
                        ref = self._recast_reference(key, live_tensor)
                    pairs.append((live_tensor, ref))
                    keys.append((key, place))
            for members in groups.values():
                for key, place in _changed_in_group(members, self._segments):
                    changed[key] = place
            for (key, place), same in zip(keys, same_bytes(pairs, self._segments)):
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
        """Whether a parameter without a known base value was changed in place since last seen (its version
        counter moved). Only a trainable parameter counts: a frozen one whose counter moves is being re-bound
        or re-registered by a library (a parametrization's ``set_``, a quantizer), not trained."""
        seen = self.versions.get(key)
        now = _version_of(tensor)
        if seen is None or seen == now:
            self.versions[key] = now
            return False
        if not tensor.requires_grad or now[1] is None:
            self.versions[key] = now  # replaced or re-bound, not trained (or an inference tensor: no counter)
            return False
        return True

    def _recast_reference(self, key: str, live: torch.Tensor) -> torch.Tensor:
        # The model was cast or moved after the base values were taken: compare in the new dtype and device.
        ref = self.base_value(key).to(device=live.device, dtype=live.dtype)
        self.reference[key] = ref
        return ref

    def _rebase(self, key: str, place: TensorPlace) -> None:
        tensor = place.tensor
        if key in self.reference:
            self.reference[key] = tensor.detach().clone()
        self.versions[key] = _version_of(tensor)

    # -- changes
    def claim(self, places: Mapping[str, TensorPlace], trainable: bool = True) -> None:
        """The live owner takes the live values of ``places`` as its own; the base keeps its base value."""
        if self.live is BASE or not places:
            return
        with self._lock:
            owned = self.owned.setdefault(self.live, set())
            if self.joint:  # several owners were active: the change belongs to each of them
                for key in places:
                    self.joint_changes[key] = (self.live, *self.joint)
                self._unshared.update(places)
            for key, place in places.items():
                self.places.setdefault(key, place)
                if key in owned:
                    continue
                ref = self.base_value(key)
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

    def share_joint(self) -> None:
        """Give each owner of the active group its own copy of what changed while the group was active.

        The live tensors hold the first owner's values; the others get copies, so each carries the joint
        change from now on (in its file, and once it is live on its own).
        """
        with self._lock:
            if not self._unshared or not self.joint:
                self._unshared.clear()
                return
            live_owner = self.live
            for key in sorted(self._unshared):
                place = self.places[key]
                value = place.tensor.detach()
                trainable = self.trainable.get(live_owner, {}).get(key, False)
                for member in self.joint:
                    self.owned.setdefault(member, set()).add(key)
                    self.stored.setdefault(member, {})[key] = value.clone()
                    if place.is_parameter:
                        self.trainable.setdefault(member, {})[key] = trainable
            self._unshared.clear()

    def replace_values(self, owner: str, values: Mapping[str, tuple[TensorPlace, torch.Tensor]]) -> None:
        """Make ``values`` all of ``owner``'s own values, written into the tensors that hold them now (no new
        tensor where one exists: a compiled model keeps its graph). Keys ``owner`` owned that ``values`` lacks go
        back to the base model's value.
        """
        with self._lock:
            owned = self.owned.setdefault(owner, set())
            stored = self.stored.setdefault(owner, {})
            live = owner == self.live
            for key in sorted(owned - set(values)):
                owned.discard(key)
                if live:
                    self.places[key].tensor.data.copy_(self.stored[BASE].pop(key))
                else:
                    stored.pop(key, None)
            with torch.no_grad():
                for key, (place, value) in values.items():
                    self.places.setdefault(key, place)
                    if live:
                        tensor = place.tensor
                        if key not in owned:  # the live value is the base model's: keep it
                            self.stored[BASE][key] = tensor.detach().clone()
                        tensor.copy_(value)
                    elif key in stored:
                        stored[key].copy_(value)
                    else:
                        stored[key] = value.clone()
                    owned.add(key)

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
                    self.versions[key] = _version_of(live)
            self.live = target

    def forget(self, owner: str) -> None:
        """Drop everything stored for ``owner`` (after ``delete_adapter``). ``owner`` must not be live."""
        if owner == self.live:
            raise RuntimeError(f"cannot forget the live owner {owner!r}: switch away first")
        with self._lock:
            self.owned.pop(owner, None)
            self.stored.pop(owner, None)
            self.trainable.pop(owner, None)
            self.joint = tuple(name for name in self.joint if name != owner)

    # -- atomic loads (see _transaction.py): everything a failed load may have changed, put back
    def __peft_buffers_snapshot__(self) -> Callable[[], None]:
        """A closure that restores this store and the live tensors it manages to their state now."""
        with self._lock:
            state = {name: _copy_nested(value) for name, value in vars(self).items() if name not in _TRANSIENT}
            live_data = {key: (place, place.tensor.data, place.tensor.requires_grad)
                         for key, place in self.places.items()}

        def restore() -> None:
            with self._lock:
                for name in [n for n in vars(self) if n not in _TRANSIENT]:
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
        return {name: value for name, value in vars(self).items() if name not in _TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        defaults = ExtraStateStore.__new__(ExtraStateStore)
        ExtraStateStore.__init__(defaults)  # attributes a store pickled by an older release lacks
        vars(self).update({k: v for k, v in vars(defaults).items() if k not in _TRANSIENT})
        vars(self).update(state)
        self._lock = threading.RLock()
        self._segments = {}
        self._adopt_pending = True  # unpickled: the parameters are new tensors (see _adopt)

    def __deepcopy__(self, memo: dict) -> ExtraStateStore:
        import copy

        clone = ExtraStateStore.__new__(ExtraStateStore)
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if clone.view is not None:  # the copied base model is complete by now (it comes before the store)
            clone._adopt(find_base_tensors(clone.view))
        return clone

    def _adopt(self, found: BaseTensors) -> None:
        """Take a copied model's parameters as this store's: their versions as the baseline, each indexed for
        the optimizer hook, and the value of every trainable parameter whose base value was not taken yet (it
        was never stepped, so its value now is its base value; an EMA copy updated in place is then compared
        with it like any other change)."""
        with self._lock:
            own = self.owned.get(self.live, ())
            for key, place in found.parameters.items():
                tensor = place.tensor
                self.versions[key] = _version_of(tensor)
                if tensor.requires_grad and key not in self.reference and key not in own:
                    self.reference[key] = tensor.detach().clone()
            _index_parameters(self, found.parameters)
            self._adopt_pending = False


def _version_of(tensor: torch.Tensor) -> tuple[int, Optional[int]]:
    """``(id, version counter)``; an inference tensor has no counter (None)."""
    return id(tensor), (None if tensor.is_inference() else tensor._version)


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
