"""The binding to PEFT (and transformers' adapter methods): thin, declarative, one place knows PEFT's versions.

:mod:`.registry` declares, per PEFT release line, where PEFT binds its state-dict functions, which adapter
methods to hook and how; :mod:`._enable` applies an entry; :mod:`._save`, :mod:`._load` and :mod:`._hooks` are
the wrappers, which call PEFT's originals and use :mod:`peft_buffers.core` for everything else;
:mod:`._peft_view` is how a PEFT model looks to the core; :mod:`._transformers` hooks transformers'
``PeftAdapterMixin``. The tools above (:mod:`peft_buffers.repro`, :mod:`peft_buffers.cli`) import from here.
"""

from . import _versions as versions
from . import registry
from ._enable import disable, enable, is_enabled, patch_status
from ._native_fields import NATIVE_FIELDS_NOTE, peft_has_native_fields
from ._peft_view import active_adapter, model_view, quiet
from ._save import extra_state_dict, extra_state_for_report
from ._transformers import mixin_min_peft

__all__ = [
    "NATIVE_FIELDS_NOTE",
    "active_adapter",
    "disable",
    "enable",
    "extra_state_dict",
    "extra_state_for_report",
    "is_enabled",
    "mixin_min_peft",
    "model_view",
    "patch_status",
    "peft_has_native_fields",
    "quiet",
    "registry",
    "versions",
]
