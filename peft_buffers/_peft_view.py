"""How peft_buffers sees a PEFT model: where the base model is, what PEFT owns, which adapter computes.

Only PEFT's stable structure is used here (``BaseTunerLayer``, ``ModulesToSaveWrapper``, ``base_layer``,
``get_base_model``, ``active_adapter``), looked up by duck typing where releases differ, so this module
needs no version switch. Everything version-specific is in ``_registry.py``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ._state import BASE, ExtraStateStore, ModelView, find_running_stats, find_trainable_parameters

__all__ = ["active_adapter", "attached_store", "ensure_store", "model_view", "sync"]

_STORE_ATTR = "_peft_buffers_store"


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

    if callable(getattr(type(root), "get_base_model", None)):  # PeftModel, PeftMixedModel
        base = root.get_base_model()
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


def active_adapter(root: nn.Module) -> Optional[str]:
    """Name of the adapter that computes now (the first one when several are active), or None.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> active_adapter(get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"])))
        'default'
    """
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
    if isinstance(names, (list, tuple)):
        names = names[0] if names else None
    return names if isinstance(names, str) else None


def attached_store(root: nn.Module) -> Optional[ExtraStateStore]:
    """The store attached to ``root``, if any (without forwarding through ``__getattr__``)."""
    return root.__dict__.get(_STORE_ATTR)


def _compiler_disable(fn: Callable) -> Callable:
    compiler = getattr(torch, "compiler", None)
    disable = getattr(compiler, "disable", None)
    return disable(fn) if disable is not None else fn


@_compiler_disable  # runs eagerly under torch.compile: it changes Python state, once
def _claim_running_stats(store: ExtraStateStore) -> None:
    store.claim_live(find_running_stats(store.view))


class ClaimStatsBeforeTraining:
    """Forward pre-hook: the first train-mode forward of an adapter that does not own the running statistics
    yet gives them to it, keeping a copy of the values it computed with (the base model's).

    A class, not a closure, so ``copy.deepcopy(model)`` gives the copy a hook bound to the copy's store, and
    whole-model pickling works.
    """

    def __init__(self, store: ExtraStateStore, is_enabled: Callable[[], bool]):
        self.store = store
        self.is_enabled = is_enabled

    def __call__(self, module: nn.Module, args: tuple) -> None:
        store = self.store
        if module.training and store.live is not BASE and not store.live_owns_stats() and self.is_enabled():
            _claim_running_stats(store)


_attach_lock = threading.Lock()


def ensure_store(root: nn.Module, is_enabled: Callable[[], bool]) -> ExtraStateStore:
    """Attach a store to ``root`` (once, thread-safe) and return it.

    The store starts with the active adapter live and the base model's values in place. A forward
    pre-hook (:class:`ClaimStatsBeforeTraining`) keeps a copy of the base model's running statistics the
    first time the model runs in train mode: so ``disable_adapter()`` and adapters that carry no statistics
    of their own still compute with the base model's values after training.
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
        store.disabled_depth = 0
        store.hook_handle = view.base.register_forward_pre_hook(ClaimStatsBeforeTraining(store, is_enabled))
        root.__dict__[_STORE_ATTR] = store
        return store


def target_owner(root: nn.Module, store: ExtraStateStore) -> Optional[str]:
    return BASE if store.disabled_depth else active_adapter(root)


def sync(root: nn.Module, peft_saved_keys: Callable[[nn.Module, str], set]) -> None:
    """Make the extra state of the adapter that should compute now live.

    Before switching away from an adapter, its trained direct parameters become its own (so they are not
    lost and do not leak into the next adapter).
    """
    store = attached_store(root)
    if store is None:
        return
    target = target_owner(root, store)
    if target == store.live:
        return
    if store.live is not BASE:
        trainable = find_trainable_parameters(store.view)
        if trainable:
            own = peft_saved_keys(root, store.live, {k: p.tensor for k, p in trainable.items()})
            store.claim_live({k: p for k, p in trainable.items() if k not in own}, trainable=True)
    store.switch(target)


def quiet(fn: Callable, *args, **kwargs):
    """Call ``fn`` with warnings silenced (used for PEFT calls made only to learn which keys PEFT owns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
