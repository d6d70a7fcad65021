"""Saving a folder: ``PeftModel.save_pretrained`` runs inside :func:`saving_folder`.

PEFT writes the adapter files itself (its ``get_peft_model_state_dict`` is wrapped, so the weights file carries
the extra state). Around that, :func:`saving_folder` gives peft_buffers one place to act on the folder as a
whole: the files peft_buffers adds beside PEFT's (:func:`write_sidecars`) are written into the same folder
before the save returns.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Union

from torch import nn

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


@contextlib.contextmanager
def saving_folder(model: nn.Module, save_directory: Union[str, os.PathLike]) -> Iterator[str]:
    """The directory PEFT should write ``model``'s adapters to; on success, peft_buffers' files are added.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with saving_folder(nn.Linear(1, 1), folder) as target:
        ...         target == folder
        True
    """
    folder = os.fspath(save_directory)
    yield folder
    write_sidecars(model, folder)
