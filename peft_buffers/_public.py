"""Small public helpers built on the core."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _peft_view as pv
from ._patch import _extra_state_for_save, _peft_saved_keys_factory

__all__ = ["extra_state_dict"]


def extra_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The extra state peft_buffers saves for ``adapter_name`` (default: the active adapter).

    Every base-model buffer and parameter that changed while the adapter was live (or that its file
    carried), minus what PEFT saves itself, keyed as in the adapter file. Works whether or not
    :func:`enable` was called (without it, only models created while it was on know their base values).

    Example:
        >>> from torch import nn
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        ...                        LoraConfig(target_modules=["0"]))
        >>> _ = model(torch.randn(4, 2))  # a train-mode forward moves the statistics
        >>> sorted(extra_state_dict(model))  # doctest: +NORMALIZE_WHITESPACE
        ['base_model.model.1.num_batches_tracked', 'base_model.model.1.running_mean',
         'base_model.model.1.running_var']
    """
    from peft.utils import save_and_load

    original_get = getattr(save_and_load.get_peft_model_state_dict, "__wrapped__",
                           save_and_load.get_peft_model_state_dict)
    name = adapter_name if adapter_name is not None else pv.active_adapter(model)
    peft_keys = set(pv.quiet(original_get, model, adapter_name=name))
    return _extra_state_for_save(model, name, None, peft_keys, _peft_saved_keys_factory(original_get))
