"""Exceptions raised by peft_buffers. All derive from :class:`PeftBuffersError`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommandError", "ExtraStateMismatch", "IncompatibleExtraState", "PeftBuffersError", "UnsupportedPeftVersion"]


class PeftBuffersError(Exception):
    """Base class of every peft_buffers exception.

    Example:
        >>> issubclass(UnsupportedPeftVersion, PeftBuffersError)
        True
    """


class CommandError(PeftBuffersError):
    """A command-line argument the command cannot act on; ``python -m peft_buffers`` prints it and exits 2.

    Example:
        >>> str(CommandError("README.md not found"))
        'README.md not found'
    """


class UnsupportedPeftVersion(PeftBuffersError, RuntimeError):
    """The installed PEFT release is not in the version registry.

    Example:
        >>> str(UnsupportedPeftVersion("0.5.0", ">=0.21.0,<0.22.0")).startswith("peft 0.5.0")
        True
    """

    def __init__(self, version: str, supported: str):
        self.version = version
        self.supported = supported
        super().__init__(
            f"peft {version} is not supported by peft_buffers (supported: {supported}). "
            f"Install a supported peft release, or call peft_buffers.enable(allow_untested=True) to use the "
            f"newest registry entry at your own risk."
        )


@dataclass(frozen=True)
class ExtraStateMismatch:
    """One key of an adapter file that does not fit the model it is loaded into."""

    key: str
    problem: str
    expected: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"- {self.key}: {self.problem}; expected {self.expected}, found {self.found}. Fix: {self.fix}"


class IncompatibleExtraState(PeftBuffersError, ValueError):
    """Extra state in an adapter file does not fit the model. Nothing was loaded.

    ``mismatches`` lists every offending key with what was expected, what was found, and the fix.

    Example:
        >>> err = IncompatibleExtraState("default", [ExtraStateMismatch(
        ...     "base_model.model.bn.running_mean", "shape differs", "(8,)", "(4,)", "rebuild the base model")])
        >>> "base_model.model.bn.running_mean" in str(err)
        True
    """

    def __init__(self, adapter_name: str, mismatches: list[ExtraStateMismatch]):
        self.adapter_name = adapter_name
        self.mismatches = list(mismatches)
        lines = "\n".join(str(m) for m in self.mismatches)
        super().__init__(
            f"adapter {adapter_name!r}: {len(self.mismatches)} key(s) of extra state (running statistics or "
            f"direct parameters) do not fit the model; nothing was loaded.\n{lines}"
        )
