"""Saving a folder: ``PeftModel.save_pretrained`` (and transformers' ``save_pretrained`` of a model with adapters)
runs inside :func:`saving_folder`.

PEFT writes the adapter files itself (its ``get_peft_model_state_dict`` is wrapped, so the weights file carries
the extra state), but into a staging folder inside the target; the files peft_buffers adds beside PEFT's
(:func:`write_sidecars`) are written there too. Then every file is moved into place, the config last, each with
one ``os.replace`` (:mod:`peft_buffers.core._publish`): a save that fails or is killed never leaves the folder
with a half-written file, or new weights beside an old config that a load would accept. A save that fails
leaves the folder and the model exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Union

from torch import nn

from .._errors import PeftBuffersWarning, escape
from ..core import exclusive, stage
from ._base_check import record_base_identity

__all__ = ["saving_folder", "write_sidecars"]


def write_sidecars(model: nn.Module, folder: str) -> None:
    """Write the files peft_buffers keeps beside PEFT's in each adapter folder PEFT just wrote under ``folder``:
    ``peft_buffers_base.json``, the identity of the base model the adapter was trained on (see
    :func:`._base_check.record_base_identity`). Works for any model with adapters (a ``PeftModel``, or a
    transformers model with adapters after its own ``save_pretrained``).

    Example:
        >>> write_sidecars(nn.Linear(1, 1), "/nonexistent")  # no adapter saved there: nothing to add
    """
    record_base_identity(model, folder)


def _config_state(model: nn.Module) -> list[tuple[object, dict]]:
    """Every adapter config object with a copy of its attributes: PEFT changes some while it saves
    (``inference_mode``, ``base_model_name_or_path``) and PEFT < 0.22 does not put them back on an error."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return []
    return [(config, dict(vars(config))) for config in configs.values() if hasattr(config, "__dict__")]


def _restore_configs(saved: list[tuple[object, dict]]) -> None:
    for config, attributes in saved:
        live = vars(config)
        for name in [name for name in live if name not in attributes]:
            del live[name]
        for name, value in attributes.items():
            if live.get(name, attributes) is not value:
                live[name] = value


@contextlib.contextmanager
def saving_folder(model: nn.Module, save_directory: Union[str, os.PathLike], *, is_main_process: bool = True
                  ) -> Iterator[str]:
    """The directory PEFT should write ``model``'s adapters to: a staging folder, published atomically.

    On success every staged file (PEFT's, and :func:`write_sidecars`') is moved into ``save_directory``, the
    config last. On failure the staging folder is removed, the folder is as it was, and the adapter configs of
    ``model`` are put back as they were before the save. A load into ``model`` from another thread waits for
    the save to end. When this process does not write (``is_main_process=False``) or ``save_directory`` is a
    file (PEFT raises its own error), PEFT gets ``save_directory`` itself.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with saving_folder(nn.Linear(1, 1), folder) as target:
        ...         with open(os.path.join(target, "adapter_config.json"), "w") as handle:
        ...             _ = handle.write("{}")
        ...         target != folder
        ...     os.listdir(folder)
        True
        ['adapter_config.json']
    """
    folder = os.fspath(save_directory)
    if not is_main_process or os.path.isfile(folder):
        yield folder
        return
    with exclusive(model):
        configs = _config_state(model)
        try:
            staged = stage(folder)
        except PermissionError as error:  # a folder whose files may be rewritten but that takes no new entry
            warnings.warn(f"peft_buffers: cannot make a staging folder in {escape(folder)} ({error.strerror}): "
                          f"saving into it directly, not atomically", PeftBuffersWarning, stacklevel=4)
            staged = None
        if staged is None:
            yield folder
            return
        try:
            yield staged.path
            write_sidecars(model, staged.path)
        except BaseException:
            _restore_configs(configs)
            staged.discard()
            raise
        try:
            staged.publish()
        except BaseException:
            _restore_configs(configs)
            raise
