"""peft_buffers: PEFT adapter files that also carry running statistics and trained direct parameters.

Example:
    >>> import peft_buffers
    >>> _ = peft_buffers.enable()   # once; then use PEFT as usual
    >>> peft_buffers.is_enabled()
    True
    >>> peft_buffers.disable()
"""

__version__ = "0.1.0"

from ._errors import (  # noqa: E402
    ConversionRefused,
    CorruptAdapterFile,
    ExtraStateMismatch,
    IncompatibleAdapterWeights,
    IncompatibleExtraState,
    PeftBuffersError,
    PeftBuffersWarning,
    RollbackFailed,
    UnsupportedPeftVersion,
)
from .binding import disable, enable, extra_state_dict, is_enabled  # noqa: E402
from .repro import AuditReport, ReloadReport, audit, check_reload, explain  # noqa: E402

__all__ = [
    "AuditReport",
    "ConversionRefused",
    "CorruptAdapterFile",
    "ExtraStateMismatch",
    "IncompatibleAdapterWeights",
    "IncompatibleExtraState",
    "PeftBuffersError",
    "PeftBuffersWarning",
    "ReloadReport",
    "RollbackFailed",
    "UnsupportedPeftVersion",
    "__version__",
    "audit",
    "check_reload",
    "disable",
    "enable",
    "explain",
    "extra_state_dict",
    "is_enabled",
]
