"""Atomic loads: snapshot a model cheaply, roll it back exactly if the load fails.

Plain torch; knows nothing about PEFT. What a snapshot holds, and why that is enough for a load:

- The module tree. For every module reachable from the root, its ``__dict__`` mapping (attribute -> object)
  and a shallow copy of its ``_modules``, ``_parameters`` and ``_buffers``. Restoring puts the *same* objects
  back (others hold references to them) and deletes attributes that were added, so wrappers injected by the
  load vanish, the original module objects are back in place and ``training`` flags are restored.
- For the modules the caller marks as *deep* (``deep(cls)``; PEFT's own classes, through the binding: tuner
  layers, wrappers, the ``PeftModel``), also a shallow copy of every other container in their ``__dict__``
  (hook dicts, per-adapter dicts such as PEFT's ``r``/``scaling``, ``peft_config``, ``active_adapters``
  lists...), and objects there that define ``__peft_buffers_snapshot__()`` (returning a callable that restores
  them) are snapshotted through it. Without ``deep`` every module is deep. A load changes the base model's
  modules only through their children, tensors and flags, so the light snapshot keeps the cost per module
  to a few dict copies.
- Every parameter's ``requires_grad``.
- Tensor values only where a load can write: the tensors the caller names (``extra_tensors`` /
  :meth:`Transaction.protect`) and whatever goes through ``load_state_dict`` on a module of the tree. While a
  transaction is open, ``nn.Module.load_state_dict`` is intercepted (once, at the class: no per-module set-up)
  for the modules of the snapshot: the live tensors named by the incoming keys are cloned, the incoming
  tensors optionally validated against them, and then the load proceeds. Base weights are never copied unless
  the incoming state dict names them.

Not covered (documented limits): tensors written in place other than through ``load_state_dict`` and not named
by the caller; mutations inside non-container objects (config objects are restored by identity, not
content); containers nested inside containers (one level is copied); hook dicts and other containers of
modules that are not deep; modules reachable only through non-``_modules`` references; a ``load_state_dict``
override that does not call ``nn.Module.load_state_dict``.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TypeVar, Union

import torch
from torch import nn

from .._errors import RollbackFailed, escape

__all__ = ["Transaction", "active_transaction", "atomic", "exclusive", "run_atomically"]

T = TypeVar("T")
Validator = Callable[[nn.Module, Mapping[str, Any], Mapping[str, torch.Tensor], bool], None]
SNAPSHOT_HOOK = "__peft_buffers_snapshot__"
_CONTAINERS = (dict, list, set)
_PLAIN = frozenset({bool, int, float, str, bytes, tuple, type(None), torch.Tensor, nn.Parameter, torch.dtype,
                    torch.device})  # attribute values that are neither containers nor snapshot objects

_lock = threading.Lock()
_active: dict[int, Transaction] = {}  # id(root) -> the outermost open transaction on that root
# One re-entrant lock per root, held by the thread that runs a transaction on it (or saves it) for the whole
# block: a load from another thread waits. id(root) -> (weak reference, lock): a model that is gone takes its
# lock with it (by identity: a module that defines __eq__ without __hash__ works too).
_root_locks: dict[int, tuple[weakref.ref, threading.RLock]] = {}


def _copy_container(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value)


def _refill(container: Any, saved: Any) -> None:
    if container:
        container.clear()
    if not saved:
        return
    if isinstance(container, list):
        container.extend(saved)
    else:
        container.update(saved)


class _ModuleState:
    __slots__ = ("module", "attrs", "contents")

    def __init__(self, module: nn.Module, attrs: dict, contents: list):
        self.module, self.attrs, self.contents = module, attrs, contents

    def restore(self) -> None:
        live = self.module.__dict__
        for name in [name for name in live if name not in self.attrs]:
            del live[name]
        for name, value in self.attrs.items():
            if live.get(name, _MISSING) is not value:
                live[name] = value
        for container, saved in self.contents:
            _refill(container, saved)


_MISSING = object()


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _resolve(module: nn.Module, key: str) -> tuple[Optional[nn.Module], Optional[str]]:
    """(owner, tensor name) for a state-dict key relative to ``module``; name None when the key names a module."""
    parts = key.split(".")
    for index, part in enumerate(parts):
        child = module._modules.get(part) if isinstance(getattr(module, "_modules", None), dict) else None
        if child is None:
            rest = ".".join(parts[index:])
            return (module, rest) if "." not in rest else (None, None)
        module = child
    return module, None


def _incoming_targets(module: nn.Module, keys: Iterable[str]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Live tensors that ``module.load_state_dict`` may write for ``keys``: {key: tensor} plus all tensors to clone.

    A key naming a module (a load pre-hook may rename it, e.g. PEFT's legacy DoRA keys) protects that module's
    whole subtree; a key naming nothing is ignored by torch and protects nothing.
    """
    live: dict[str, torch.Tensor] = {}
    clone: list[torch.Tensor] = []
    for key in keys:
        owner, name = _resolve(module, key)
        if owner is None:
            continue
        if name is None:
            clone.extend(t for t in owner.parameters() if t is not None)
            clone.extend(t for t in owner.buffers() if t is not None)
            continue
        tensor = owner._parameters.get(name)
        if tensor is None and name not in getattr(owner, "_non_persistent_buffers_set", ()):
            tensor = owner._buffers.get(name)
        if tensor is not None:
            live[key] = tensor
            clone.append(tensor)
    return live, clone


class Transaction:
    """An open snapshot of ``root``: :meth:`restore` puts the model back exactly as it was at the start.

    Created by :func:`atomic`; use :meth:`protect` to add tensors a load will write outside ``load_state_dict``.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> before = layer.bias.clone()
        >>> with atomic(layer) as transaction:
        ...     transaction.protect([layer.bias])
        ...     with torch.no_grad():
        ...         _ = layer.bias.add_(1)
        ...     transaction.restore()  # what a failure does
        >>> torch.equal(layer.bias, before)
        True
    """

    def __init__(self, root: nn.Module, describe: Optional[str], validate: Optional[Validator],
                 deep: Optional[Callable[[type], bool]] = None):
        self.root = root
        self.describe = describe
        self.validate = validate
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (live tensor, clone)
        self._modules: list[_ModuleState] = []
        self._light: list[tuple[nn.Module, dict, dict, dict, dict]] = []
        self._requires_grad: list[tuple[torch.Tensor, bool]] = []
        self._restorers: list[Callable[[], None]] = []
        self._existing: set[int] = set()  # ids of the tensors there at the start: only those can need a clone
        self.module_ids: set[int] = set()  # the modules whose load_state_dict is intercepted
        self.memo: dict[str, Any] = {}  # for the caller: what it already did during this load (checked files)
        self.open = True
        self.thread = threading.get_ident()  # the only thread that joins it
        with _no_gc():  # thousands of small copies would trigger full collections of a large heap
            self._snapshot(root, deep)

    def _snapshot(self, root: nn.Module, deep: Optional[Callable[[type], bool]]) -> None:
        seen_hooks: set[int] = set()
        depth: dict[type, bool] = {}
        ids = self.module_ids
        existing = self._existing
        requires_grad = self._requires_grad
        light = self._light
        stack = [root]
        while stack:
            module = stack.pop()
            if module is None or id(module) in ids:
                continue
            ids.add(id(module))
            attrs = module.__dict__.copy()
            children, parameters, buffers = attrs["_modules"], attrs["_parameters"], attrs["_buffers"]
            stack.extend(children.values())
            for param in parameters.values():
                if param is not None and id(param) not in existing:
                    existing.add(id(param))
                    requires_grad.append((param, param.requires_grad))
            for buffer in buffers.values():
                if buffer is not None:
                    existing.add(id(buffer))
            cls = type(module)
            is_deep = depth.get(cls)
            if is_deep is None:
                is_deep = depth[cls] = deep is None or deep(cls)
            if not is_deep and module is not root:  # the root holds what a load addresses: always in full
                light.append((module, attrs, children.copy() if children else None,
                              parameters.copy() if parameters else None, buffers.copy() if buffers else None))
                continue
            contents = []
            for value in attrs.values():
                kind = type(value)
                if kind in _PLAIN:
                    continue
                if isinstance(value, _CONTAINERS):
                    # most containers (hook dicts) are empty: nothing to copy, restoring them is clearing them
                    contents.append((value, _copy_container(value) if value else None))
                    continue
                hook = getattr(kind, SNAPSHOT_HOOK, None)
                if hook is not None and id(value) not in seen_hooks:
                    seen_hooks.add(id(value))
                    self._restorers.append(hook(value))
            self._modules.append(_ModuleState(module, attrs, contents))

    # ------------------------------------------------------------------ what a load may write

    def protect(self, tensors: Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]]) -> None:
        """Clone the current values of ``tensors`` (once each) so that :meth:`restore` writes them back.

        Example:
            >>> layer = nn.Linear(2, 2)
            >>> with atomic(layer) as transaction:
            ...     transaction.protect({"bias": layer.bias})
        """
        values = tensors.values() if isinstance(tensors, Mapping) else tensors
        for tensor in values:
            if tensor is None or id(tensor) in self._saved:
                continue
            if tensor.device.type == "meta":
                continue  # nothing to keep; a load assigns a new tensor in its place
            with torch.no_grad():
                self._saved[id(tensor)] = (tensor, tensor.detach().clone())

    def _before_load(self, module: nn.Module, state_dict: Mapping[str, Any], assign: bool) -> None:
        live, to_clone = _incoming_targets(module, list(state_dict))
        if self.validate is not None:
            self.validate(module, state_dict, live, assign)  # before anything is written
        # A tensor made during the load (a new adapter's weights) goes with its module at a rollback: no clone.
        # The snapshot holds every tensor that was there, so their ids cannot be reused meanwhile.
        self.protect(t for t in to_clone if id(t) in self._existing)

    # ------------------------------------------------------------------ rollback

    def restore(self) -> None:
        """Put the module tree, ``requires_grad`` flags, protected tensors and snapshot objects back.

        Example:
            >>> net = nn.Sequential(nn.Linear(2, 2))
            >>> with atomic(net) as transaction:
            ...     _ = net.append(nn.ReLU())
            ...     transaction.restore()
            >>> len(net)
            1
        """
        for state in self._modules:
            state.restore()
        for module, attrs, children, parameters, buffers in self._light:
            _restore_light(module, attrs, children, parameters, buffers)
        for param, requires_grad in self._requires_grad:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
        with torch.no_grad():
            for live, saved in self._saved.values():
                if live.shape == saved.shape and live.dtype == saved.dtype and live.device == saved.device:
                    live.copy_(saved)
                else:  # the load rebound `.data` (another shape, dtype or device): rebind it back
                    live.data = saved
        for restorer in reversed(self._restorers):
            restorer()


def _restore_light(module: nn.Module, attrs: dict, children: Optional[dict], parameters: Optional[dict],
                   buffers: Optional[dict]) -> None:
    live = module.__dict__
    for name in [name for name in live if name not in attrs]:
        del live[name]
    for name, value in attrs.items():
        if live.get(name, _MISSING) is not value:
            live[name] = value
    for container, saved in ((attrs["_modules"], children), (attrs["_parameters"], parameters),
                             (attrs["_buffers"], buffers)):
        saved = saved or {}  # None: it was empty
        if len(container) != len(saved) or any(container.get(k, _MISSING) is not v for k, v in saved.items()):
            container.clear()
            container.update(saved)


# While any transaction is open, nn.Module.load_state_dict is replaced, once, at the class: a call on a module
# of an open transaction's snapshot protects and checks what it will write, then loads.
_open: list[Transaction] = []
_original_load_state_dict: Optional[Callable] = None


def _intercepted_load_state_dict(self: nn.Module, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    for transaction in tuple(_open):
        if transaction.open and id(self) in transaction.module_ids:
            assign = kwargs.get("assign", args[1] if len(args) > 1 else False)
            transaction._before_load(self, state_dict, bool(assign))
            break
    return _original_load_state_dict(self, state_dict, *args, **kwargs)


def _open_transaction(transaction: Transaction) -> None:
    global _original_load_state_dict
    with _lock:
        if not _open:
            _original_load_state_dict = nn.Module.load_state_dict
            nn.Module.load_state_dict = _intercepted_load_state_dict
        _open.append(transaction)


def _close_transaction(transaction: Transaction) -> None:
    global _original_load_state_dict
    with _lock:
        transaction.open = False
        if transaction in _open:
            _open.remove(transaction)
        if not _open and _original_load_state_dict is not None:
            if nn.Module.__dict__.get("load_state_dict") is _intercepted_load_state_dict:
                nn.Module.load_state_dict = _original_load_state_dict
            _original_load_state_dict = None


def active_transaction(root: nn.Module) -> Optional[Transaction]:
    """The open transaction on ``root`` (the outermost one) run by the calling thread, or None.

    Another thread's transaction is never returned: a load from this thread waits for it instead of joining.

    Example:
        >>> layer = nn.Linear(1, 1)
        >>> with atomic(layer) as transaction:
        ...     active_transaction(layer) is transaction
        True
        >>> active_transaction(layer) is None
        True
    """
    with _lock:
        transaction = _active.get(id(root))
    return transaction if transaction is not None and transaction.thread == threading.get_ident() else None


def _root_lock(root: nn.Module) -> threading.RLock:
    key = id(root)
    with _lock:
        entry = _root_locks.get(key)
        if entry is None or entry[0]() is not root:
            entry = _root_locks[key] = (weakref.ref(root, _forget_lock(key)), threading.RLock())
        return entry[1]


def _forget_lock(key: int) -> Callable[[weakref.ref], None]:
    def forget(ref: weakref.ref) -> None:  # no lock taken: a collection may run this anywhere
        entry = _root_locks.get(key)
        if entry is not None and entry[0] is ref:
            _root_locks.pop(key, None)

    return forget


@contextlib.contextmanager
def exclusive(root: nn.Module) -> Iterator[None]:
    """Hold ``root``'s lock for the block: a load into ``root`` from another thread waits until it ends.

    The lock :func:`atomic` holds for a whole load; re-entrant, so a load inside the block (same thread) runs.
    A save holds it so that it never sees a model halfway through another thread's load.

    Example:
        >>> layer = nn.Linear(1, 1)
        >>> with exclusive(layer):
        ...     with atomic(layer) as transaction:  # the same thread: not blocked
        ...         transaction.open
        True
    """
    lock = _root_lock(root)
    with lock:
        yield


def _annotate(error: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:  # PEP 678 attribute: shown by the `exceptiongroup` backport's traceback; harmless elsewhere
        notes = getattr(error, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            try:
                error.__notes__ = notes  # type: ignore[attr-defined]
            except AttributeError:
                return
        notes.append(note)


def _default_validator() -> Validator:
    from ._adapter_file import check_state_dict_fits

    return check_state_dict_fits


_DEFAULT = object()


@contextlib.contextmanager
def atomic(
    root: nn.Module,
    *,
    extra_tensors: Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]] = (),
    describe: Optional[str] = None,
    validate: Any = _DEFAULT,
    deep: Optional[Callable[[type], bool]] = None,
) -> Iterator[Transaction]:
    """Run the body as one load of ``root``: if it raises, ``root`` is restored exactly and the error re-raised.

    ``extra_tensors``: tensors the body writes in place outside ``load_state_dict`` (their values are cloned
    now). ``describe``: what is loaded, e.g. ``"adapter 'b' from /path"``; it goes into the note added to the
    re-raised exception (``add_note``; the exception keeps its type). ``validate(module, state_dict, live,
    assign)`` runs inside every intercepted ``load_state_dict`` before anything is written (default:
    :func:`peft_buffers.core.check_state_dict_fits`, shapes and dtype kinds; None: no check). ``deep(cls)``:
    whether modules of class ``cls`` get the full snapshot (every container of their ``__dict__``) rather than
    the light one (children, tensors, attributes); default: every module. The root always gets the full one.

    Nested on the same root in the same thread, the inner block joins the outer transaction (its tensors are
    protected by the outer one, which does the rollback when the inner block's exception reaches it). A
    transaction on ``root`` from another thread is never joined: this one waits until it has ended (one
    re-entrant lock per root, see :func:`exclusive`), then takes its own snapshot. If rolling back itself
    fails, :class:`RollbackFailed` is raised from the rollback error, carrying the original exception as
    ``original``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> try:
        ...     with atomic(net, describe="a demo"):
        ...         net[0] = nn.Identity()
        ...         raise KeyError("boom")
        ... except KeyError as error:
        ...     print(type(net[0]).__name__, error.__notes__[0].startswith("peft_buffers: a demo failed"))
        Linear True
    """
    with exclusive(root):  # another thread's load into root ends first: never joined
        outer = active_transaction(root)
        if outer is not None:
            outer.protect(extra_tensors)
            yield outer
            return
        transaction = Transaction(root, describe, _default_validator() if validate is _DEFAULT else validate, deep)
        transaction.protect(extra_tensors)
        with _lock:
            _active[id(root)] = transaction
        try:
            _open_transaction(transaction)
            yield transaction
        except BaseException as error:
            try:
                transaction.restore()
            except BaseException as rollback_error:
                raise RollbackFailed(describe, error) from rollback_error
            what = escape(describe or "a load")
            _annotate(error, f"peft_buffers: {what} failed; the model was rolled back to its state before it.")
            raise
        finally:
            _close_transaction(transaction)
            with _lock:
                _active.pop(id(root), None)


def run_atomically(
    root: nn.Module,
    fn: Callable[..., T],
    *args: Any,
    extra_tensors: Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]] = (),
    describe: Optional[str] = None,
    validate: Any = _DEFAULT,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)`` inside :func:`atomic` on ``root``: its result, or ``root`` unchanged and the error.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> run_atomically(net, lambda: len(net))
        1
    """
    with atomic(root, extra_tensors=extra_tensors, describe=describe, validate=validate):
        return fn(*args, **kwargs)

