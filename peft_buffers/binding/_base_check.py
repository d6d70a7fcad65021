"""Before an adapter is loaded: is the base model it goes onto the one it was trained on?

Every load path calls :func:`check_base_before_load` before it changes anything: ``PeftModel.from_pretrained``
and ``load_adapter`` (``_hooks.py``), transformers' native ``load_adapter`` (``_transformers.py``), and
hotswapping. It compares the identity recorded in the adapter folder (``peft_buffers_base.json``) with the base
the adapter is loaded onto and, by ``enable(base_check=...)``: ``"warn"`` (default) warns with
:class:`~peft_buffers.BaseMismatchWarning`, ``"error"`` raises :class:`~peft_buffers.BaseMismatch`, ``"off"``
reads nothing. A folder without the file (stock PEFT's, an older peft_buffers') loads silently.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from typing import Iterator, Optional, Union

from torch import nn

from .._errors import BaseMismatch, BaseMismatchWarning, PeftBuffersWarning, base_mismatch_message
from ..core import base_differences, find_weights_file, read_sidecar
from . import _current
from . import _peft_view as pv
from ._base_identity import live_identity, write_identities

__all__ = ["BASE_CHECK_MODES", "base_check_mode", "base_mismatches", "check_base_before_load",
           "check_base_before_transformers_load",
           "record_base_identity", "warn_instead_of_raising"]

BASE_CHECK_MODES = ("warn", "error", "off")

_local = threading.local()
_findings_lock = threading.Lock()
# base module -> {adapter name: the differences found when it was loaded onto it}
_FINDINGS: weakref.WeakKeyDictionary[nn.Module, dict[str, list[str]]] = weakref.WeakKeyDictionary()


def base_check_mode() -> str:
    """The mode in force: ``enable(base_check=...)``'s (``"warn"`` for ``"error"`` inside
    :func:`warn_instead_of_raising`), or ``"off"`` while disabled.

    Example:
        >>> import peft_buffers
        >>> peft_buffers.disable(); base_check_mode()
        'off'
    """
    patch = _current.patch
    mode = patch.base_check if patch is not None else "off"
    return "warn" if mode == "error" and getattr(_local, "no_raise", False) else mode


@contextlib.contextmanager
def warn_instead_of_raising() -> Iterator[None]:
    """Inside, in this thread, a mismatch warns even with ``base_check="error"`` (``check_reload`` reports it)."""
    previous = getattr(_local, "no_raise", False)
    _local.no_raise = True
    try:
        yield
    finally:
        _local.no_raise = previous


def check_base_before_load(model: nn.Module, model_id: Union[str, os.PathLike, None], subfolder: Optional[str] = None,
                           adapter_name: Optional[str] = None, stacklevel: int = 3) -> Optional[list[str]]:
    """Compare the base identity recorded in the adapter folder ``model_id`` with ``model``'s base.

    Call it before anything changes. Returns the differences (empty: the same base), or None when nothing was
    checked (mode ``"off"``, a Hub id, no recorded identity). Mode ``"warn"`` warns
    (:class:`~peft_buffers.BaseMismatchWarning`), ``"error"`` raises :class:`~peft_buffers.BaseMismatch`.

    Example:
        >>> check_base_before_load(nn.Linear(1, 1), "/nonexistent") is None
        True
    """
    mode = base_check_mode()
    if mode == "off" or model_id is None:
        return None
    transaction = pv.covering_transaction(model)
    checked = transaction.memo.setdefault("checked_bases", set()) if transaction is not None else set()
    if (str(model_id), subfolder) in checked:
        return None  # load_adapter inside PeftModel.from_pretrained, which checked this folder already
    checked.add((str(model_id), subfolder))
    weights = find_weights_file(model_id, subfolder)
    if weights is None:
        return None
    name = adapter_name or "default"
    where = f"adapter {name!r} from {weights.parent}"
    try:
        recorded = read_sidecar(weights.parent)
        if recorded is None:
            return None
        differences = base_differences(recorded, live_identity(model, compare_with=recorded))
    except Exception as error:  # noqa: BLE001 - a check that cannot run must not stop the load
        warnings.warn(f"peft_buffers: could not compare the base model with the one {where} was trained on: "
                      f"{type(error).__name__}: {error}", PeftBuffersWarning, stacklevel=stacklevel)
        return None
    if differences and mode == "error":
        raise BaseMismatch(where, differences)
    with _findings_lock:
        _FINDINGS.setdefault(pv.model_view(model).base, {})[name] = differences
    if differences:
        warnings.warn(base_mismatch_message(where, differences, loaded=True), BaseMismatchWarning,
                      stacklevel=stacklevel)
    return differences


def check_base_before_transformers_load(root: nn.Module, arguments: dict) -> Optional[list[str]]:
    """:func:`check_base_before_load` for transformers' ``load_adapter`` (its bound ``arguments``).

    Example:
        >>> check_base_before_transformers_load(nn.Linear(1, 1), {"adapter_state_dict": {}}) is None
        True
    """
    if arguments.get("adapter_state_dict") is not None:
        return None  # tensors given directly: no folder, no recorded identity
    model_id = arguments.get("peft_model_id") or getattr(arguments.get("load_config"), "pretrained_model_name_or_path",
                                                          None)
    subfolder = {**(arguments.get("adapter_kwargs") or {}), **(arguments.get("kwargs") or {})}.get("subfolder")
    return check_base_before_load(root, model_id, subfolder, arguments.get("adapter_name"), stacklevel=6)


def base_mismatches(model: nn.Module) -> dict[str, list[str]]:
    """For each adapter of ``model`` that was loaded onto another base than it was trained on: how it differs.

    Example:
        >>> base_mismatches(nn.Linear(1, 1))
        {}
    """
    with _findings_lock:
        found = dict(_FINDINGS.get(pv.model_view(model).base, {}))
    names = getattr(model, "peft_config", None)
    return {name: lines for name, lines in found.items() if lines and (not isinstance(names, dict) or name in names)}


def record_base_identity(model: nn.Module, folder: Union[str, os.PathLike]) -> None:
    """Write ``peft_buffers_base.json``, the identity of the base each adapter was trained on, into each adapter
    folder just saved under ``folder``.

    Works for any model with adapters: a ``PeftModel`` (adapter ``default`` in ``folder``, the others in
    subfolders) or a transformers model with adapters (its active adapter in ``folder``). Nothing is written
    while disabled or with ``enable(base_check="off")``, nor for a sharded base (FSDP2, DeepSpeed ZeRO-3). An
    ``OSError`` writing the file is raised (the save fails, as for PEFT's own files); an identity that cannot be
    computed is a warning.

    Example:
        >>> record_base_identity(nn.Linear(1, 1), "/nonexistent")  # no adapter: nothing to add
    """
    if base_check_mode() == "off":
        return
    try:
        write_identities(model, os.fspath(folder))
    except OSError:
        raise  # the file could not be written: the save fails like one of PEFT's files (and publishes nothing)
    except Exception as error:  # noqa: BLE001 - an identity that cannot be computed must not stop the save
        warnings.warn(f"peft_buffers: the identity of the base model was not recorded in {os.fspath(folder)} "
                      f"({type(error).__name__}: {error}); loading will not check the base", PeftBuffersWarning,
                      stacklevel=4)
