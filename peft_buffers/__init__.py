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

__version__ = "0.1.0"

__all__ = [
    "ExtraStateMismatch",
    "IncompatibleExtraState",
    "PeftBuffersError",
    "UnsupportedPeftVersion",
    "__version__",
    "disable",
    "enable",
    "extra_state_dict",
    "is_enabled",
]
