"""How peft_buffers sees a PEFT model: where the base model is, what PEFT owns, which adapter computes.

Only PEFT's stable structure is used here (``BaseTunerLayer``, ``ModulesToSaveWrapper``, ``base_layer``,
``get_base_model``, ``active_adapter``), looked up by duck typing where releases differ, so this module
needs no version switch. Everything version-specific is in ``registry.py``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional, Union

from torch import nn

from .._errors import PeftBuffersWarning
from .._text import first_names
from ..core import BASE, BaseTensors, ExtraStateStore, ModelView, Transaction, active_transaction, find_base_tensors

__all__ = ["STORE_ATTR", "active_adapter", "active_adapters", "attach_walk", "attached_store", "complete_captures",
           "covering_transaction", "defer_captures",
           "ensure_store", "model_view", "settle", "structure_changed", "sync", "wraps_for"]

STORE_ATTR = "_peft_buffers_store"  # where a model (and its tuner) keeps its store


def _peft_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(wrapper classes whose subtree PEFT saves itself, tuner-layer classes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import other

    wrappers = tuple(
        cls
        for cls in (getattr(other, name, None) for name in ("AuxiliaryTrainingWrapper", "ModulesToSaveWrapper"))
        if isinstance(cls, type)
    )
    return wrappers, (BaseTunerLayer,)


def _base_of(root: nn.Module) -> tuple[nn.Module, str]:
    """The base model inside ``root`` and its state-dict prefix."""
    from peft.tuners.tuners_utils import BaseTuner

    tuner = root._modules.get("base_model")
    if callable(getattr(type(root), "get_base_model", None)):  # PeftModel
        base = root.get_base_model()
    elif isinstance(tuner, BaseTuner):  # PeftMixedModel (its get_base_model is forwarded to the tuner)
        base = tuner.model
    elif isinstance(root, BaseTuner):  # a tuner (LoraModel, ...) used directly
        base = root.model
    else:  # a transformers model with injected adapters, or a plain module
        return root, ""
    queue = [("", root)]
    for _depth in range(3):
        nxt = []
        for prefix, module in queue:
            for name, child in module._modules.items():
                if child is base:
                    return base, f"{prefix}{name}."
                if child is not None:
                    nxt.append((f"{prefix}{name}.", child))
        queue = nxt
    return root, ""


def model_view(root: nn.Module) -> ModelView:
    """The :class:`ModelView` of a PEFT model (``PeftModel``, a tuner, or a transformers model with adapters).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> net = get_peft_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        ...                      LoraConfig(target_modules=["0"]))
        >>> model_view(net).base_prefix
        'base_model.model.'
    """
    wrappers, tuner_layers = _peft_classes()
    base, prefix = _base_of(root)
    # A tuner layer holds the base layer under `base_layer` and adapter weights in other children
    # (PEFT 0.6's LoRA layers *are* the base layer: their own parameters are base parameters).
    return ModelView(base=base, base_prefix=prefix, owned_types=wrappers, partial_types=tuner_layers)


def active_adapters(root: nn.Module) -> list[str]:
    """Names of the adapters that compute now, first one first (several after ``base_model.set_adapter([...])``).

    For a ``PeftModel`` the tuner's list is the truth: ``PeftModel.active_adapter`` keeps the name it was last
    given, which PEFT does not update when several adapters are activated on the tuner.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> active_adapters(get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"])))
        ['default']
    """
    from peft.tuners.tuners_utils import BaseTuner

    tuner = root._modules.get("base_model")
    if isinstance(tuner, BaseTuner):
        names = tuner.active_adapter
    elif isinstance(root, BaseTuner):
        names = root.active_adapter
    else:
        names = root.__dict__.get("active_adapter") if "active_adapter" in root.__dict__ else None
        if names is None:
            try:
                names = root.active_adapter
            except AttributeError:
                names = None
        # transformers' PeftAdapterMixin: active_adapters() is a method (5.x has no active_adapter at all)
        if names is None or callable(names):
            getter = getattr(root, "active_adapters", None)
            try:
                names = getter() if callable(getter) else None
            except (ValueError, AttributeError):
                names = None
    if isinstance(names, str):
        return [names]
    return [name for name in names if isinstance(name, str)] if isinstance(names, (list, tuple)) else []


def active_adapter(root: nn.Module) -> Optional[str]:
    """Name of the adapter that computes now (the first one when several are active), or None.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> active_adapter(get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"])))
        'default'
    """
    names = active_adapters(root)
    return names[0] if names else None


def attached_store(root: nn.Module) -> Optional[ExtraStateStore]:
    """The store attached to ``root``, if any (without forwarding through ``__getattr__``)."""
    return root.__dict__.get(STORE_ATTR)


_attach_lock = threading.Lock()


def ensure_store(root: nn.Module, is_enabled: Callable[[], bool] = lambda: True, late: Union[bool, str] = False
                 ) -> ExtraStateStore:
    """Attach a store to ``root`` (once, thread-safe) and return it.

    The store starts with the active adapter live and takes the base values at once: a copy of every
    persistent buffer, the version of every parameter (:meth:`ExtraStateStore.capture`). ``late`` says the
    store is attached only now, after the model was created, and where (``"save"``, ``"load"``, ``"query"``,
    ``"inspect"``): then the base values were not seen before training, and a save falls back to carrying every
    running statistic and every trainable parameter (with a warning).
    """
    store = attached_store(root)
    if store is not None:
        return store
    with _attach_lock:
        store = attached_store(root)
        if store is not None:
            return store
        view = model_view(root)
        store = ExtraStateStore(live=active_adapter(root), view=view)
        store.late = late
        found = find_base_tensors(view)
        transaction = covering_transaction(root)
        if transaction is not None and transaction.memo.get(_DEFER) is not None:
            transaction.memo[_DEFER].append((store, found))  # PeftModel.from_pretrained takes them at its end
        else:
            store.capture(found)
        root.__dict__[STORE_ATTR] = store
        _remember_walk(root, found)
        return store


# PeftModel.from_pretrained attaches a store and loads a file into it, with no user code in between: the base
# values of what the file then carries are the ones the load keeps for the base model, so the copy of every
# buffer is taken at the end of the load, of the buffers no adapter owns.
_DEFER = "deferred_captures"


def defer_captures(transaction: Transaction) -> None:
    """Stores attached during ``transaction`` take their base values only at :func:`complete_captures`."""
    transaction.memo[_DEFER] = []


def complete_captures(transaction: Transaction) -> None:
    """Take the base values of the stores attached since :func:`defer_captures` (before the load succeeds)."""
    for store, found in transaction.memo.pop(_DEFER, ()):
        store.capture(found)


# Inside one load (one transaction, no user code in between) the walk made when a store attaches stays valid
# until PEFT injects modules: the load's plan reuses it, and nothing can have changed since the capture.
_WALKS = "walks"


def _remember_walk(root: nn.Module, found: BaseTensors) -> None:
    transaction = covering_transaction(root)
    if transaction is not None:
        transaction.memo.setdefault(_WALKS, {})[id(root)] = found


def attach_walk(root: nn.Module) -> Optional[BaseTensors]:
    """The walk made when ``root``'s store attached during the current load, while it is still valid."""
    transaction = covering_transaction(root)
    return transaction.memo.get(_WALKS, {}).get(id(root)) if transaction is not None else None


def structure_changed(root: nn.Module) -> None:
    """Forget walks made during the current load (PEFT injected or removed modules)."""
    transaction = covering_transaction(root)
    if transaction is not None:
        transaction.memo.pop(_WALKS, None)


def covering_transaction(root: nn.Module) -> Optional[Transaction]:
    """The open load transaction on ``root`` or, for a PEFT model, on its base model (``from_pretrained``'s)."""
    transaction = active_transaction(root)
    get_base = getattr(type(root), "get_base_model", None)
    if transaction is None and callable(get_base):
        transaction = active_transaction(get_base(root))
    return transaction


def target_owner(root: nn.Module, store: ExtraStateStore) -> tuple[Optional[str], tuple[str, ...]]:
    """Whose extra state should be live now, and the other adapters active together with it.

    The base model's own values inside ``disable_adapter()``, after ``disable_adapter_layers()`` and after
    ``unload()``; otherwise the first active adapter's (with several active, the others are the group).
    """
    if store.disabled_depth or store.layers_disabled or store.unloaded:
        return BASE, ()
    names = active_adapters(root)
    return (names[0], tuple(names[1:])) if names else (BASE, ())


def settle(root: nn.Module, store: ExtraStateStore, peft_saved_keys: Callable, found: Optional[BaseTensors] = None
           ) -> BaseTensors:
    """Attribute what changed since the last look to the live adapter (see ``ExtraStateStore.settle``).

    Returns the walk it made, for the caller to reuse.
    """
    found = found if found is not None else find_base_tensors(store.view)
    live = store.live

    def peft_keys(candidates: dict) -> set:
        # PEFT names tensors by their live keys; the store by base keys.
        by_live = {found.get(key).live_key: key for key in candidates}
        own = peft_saved_keys(root, live, {found.get(k).live_key: t for k, t in candidates.items()})
        return {by_live[k] for k in own if k in by_live}

    store.settle(found, peft_keys)
    return found


def sync(root: nn.Module, peft_saved_keys: Callable[[nn.Module, str], set]) -> None:
    """Make the extra state of the adapter that should compute now live.

    Before switching away from an adapter, what changed while it was live becomes its own (so it is not lost
    and does not leak into the next adapter).
    """
    store = attached_store(root)
    if store is None:
        return
    target, group = target_owner(root, store)
    if target == store.live and group == store.joint:
        return
    settle(root, store, peft_saved_keys)
    store.share_joint()  # what changed while a group was active is now each member's own
    store.switch(target)
    store.joint = group
    if group:
        _warn_group(store)


def _warn_group(store: ExtraStateStore) -> None:
    """Several adapters are active, and only the first one's extra state can be live: say what is not."""
    members = (store.live, *store.joint)
    hidden = {}
    for member in store.joint:
        for key in store.owned_keys(member):
            if store.value(member, key) is not store.value(store.live, key):
                hidden.setdefault(member, []).append(key)
    if not hidden:
        return
    details = "; ".join(f"adapter {name!r}: {first_names(sorted(keys))}" for name, keys in hidden.items())
    warnings.warn(
        f"peft_buffers: adapters {', '.join(map(repr, members))} are active together, and only {store.live!r}'s "
        f"extra state is live; the others' own values are not used while the group is active ({details}). "
        f"What training changes now is saved with each of them.",
        PeftBuffersWarning, stacklevel=4)


def wraps_for(adapter_name: Optional[str]) -> Callable[[nn.Module], bool]:
    """For ``plan_load``: does this ``modules_to_save`` wrapper hold ``adapter_name``'s own copy (PEFT's keys)?"""

    def wraps_for_adapter(wrapper: nn.Module) -> bool:
        copies = wrapper._modules.get("modules_to_save")
        if copies is not None and adapter_name in getattr(copies, "_modules", {}):
            return True
        token_adapter = wrapper._modules.get("token_adapter")  # trainable tokens (PEFT >= 0.15)
        return token_adapter is not None and adapter_name in getattr(token_adapter, "trainable_tokens_delta", {})

    return wraps_for_adapter


def quiet(fn: Callable, *args, **kwargs):
    """Call ``fn`` with warnings silenced (used for PEFT calls made only to learn which keys PEFT owns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
