"""peft_buffers: PEFT adapter files that also carry running statistics and trained direct parameters.

Example:
    >>> import peft_buffers
    >>> _ = peft_buffers.enable()   # once; then use PEFT as usual
    >>> peft_buffers.is_enabled()
    True
    >>> peft_buffers.disable()
"""

from ._errors import ExtraStateMismatch, IncompatibleExtraState, PeftBuffersError, UnsupportedPeftVersion
from ._patch import disable, enable, is_enabled
from ._public import extra_state_dict
from ._repro import AuditReport, ReloadReport, audit, check_reload, explain

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "ExtraStateMismatch",
    "IncompatibleExtraState",
    "PeftBuffersError",
    "ReloadReport",
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
