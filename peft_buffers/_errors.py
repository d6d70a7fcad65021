"""Exceptions raised by peft_buffers. All derive from :class:`PeftBuffersError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ._text import escape, plural  # escape: re-exported, messages everywhere use it

__all__ = [
    "BaseMismatch",
    "BaseMismatchWarning",
    "CommandError",
    "ConversionRefused",
    "CorruptAdapterFile",
    "ExtraStateMismatch",
    "IncompatibleAdapterWeights",
    "IncompatibleExtraState",
    "PeftBuffersError",
    "PeftBuffersWarning",
    "RollbackFailed",
    "UnsupportedPeftVersion",
    "escape",
    "listing",
]

SHOWN = 20  # a refusal names this many offending keys, then counts the rest
def listing(lines: Iterable[str], shown: int = SHOWN, what: str = "key(s)", separator: str = "\n") -> str:
    """The first ``shown`` items, one per line (or ``separator``), then a count of the rest: a message stays short.

    Example:
        >>> print(listing([f"- k{i}" for i in range(4)], shown=2))
        - k0
        - k1
        ... and 2 more key(s)
        >>> listing(["a", "b", "c"], shown=2, what="tensor(s)", separator=", ")
        'a, b, ... and 1 more tensor(s)'
    """
    head, rest = [], 0
    for line in lines:
        if len(head) < shown:
            head.append(line)
        else:
            rest += 1
    if rest:
        head.append(f"... and {rest:,} more {what}")
    return separator.join(head)


class PeftBuffersError(Exception):
    """Base class of every peft_buffers exception.

    Example:
        >>> issubclass(UnsupportedPeftVersion, PeftBuffersError)
        True
    """


class PeftBuffersWarning(UserWarning):
    """Base class of every warning peft_buffers emits (filter them with ``warnings.filterwarnings``).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("x", PeftBuffersWarning)
        >>> issubclass(caught[0].category, UserWarning)
        True
    """


class BaseMismatchWarning(PeftBuffersWarning):
    """An adapter is being loaded onto another base model than the one it was trained on (another checkpoint or
    revision, dtype, quantization, or base values), as recorded in its folder when it was saved.

    Example:
        >>> issubclass(BaseMismatchWarning, UserWarning)
        True
    """


def base_mismatch_message(where: str, differences: Sequence[str], loaded: bool) -> str:
    """The text of :class:`BaseMismatch` and :class:`BaseMismatchWarning`.

    Example:
        >>> print(base_mismatch_message("adapter 'default' from out", ["running statistics differ: bn.running_mean "
        ...       "(the adapter does not carry them)"], loaded=True))  # doctest: +NORMALIZE_WHITESPACE
        adapter 'default' from out: the base model differs from the one the adapter was trained on
        (as recorded in peft_buffers_base.json when it was saved):
        - running statistics differ: bn.running_mean (the adapter does not carry them)
        Load it onto the base it was trained on (python -m peft_buffers inspect DIR shows it), or call
        peft_buffers.enable(base_check="off") to skip this check.
    """
    outcome = "" if loaded else " Nothing was loaded."
    lines = "\n".join(f"- {line}" for line in differences)
    return (f"{where}: the base model differs from the one the adapter was trained on (as recorded in "
            f"peft_buffers_base.json when it was saved):\n{lines}\nLoad it onto the base it was trained on "
            f"(python -m peft_buffers inspect DIR shows it), or call peft_buffers.enable(base_check=\"off\") to "
            f"skip this check.{outcome}")


class BaseMismatch(PeftBuffersError, ValueError):
    """With ``enable(base_check="error")``: an adapter is being loaded onto another base model than the one it
    was trained on. Raised before anything changes (``from_pretrained`` leaves the base model as it was,
    ``load_adapter`` the model). ``differences`` has one line per kind of difference.

    Example:
        >>> err = BaseMismatch("adapter 'a' from out",
        ...                    ["trained on float32 weights, loading onto bfloat16 (4 tensors)"])
        >>> err.differences
        ['trained on float32 weights, loading onto bfloat16 (4 tensors)']
        >>> str(err).endswith("Nothing was loaded.")
        True
    """

    def __init__(self, where: str, differences: Sequence[str]):
        self.where = where
        self.differences = list(differences)
        super().__init__(base_mismatch_message(where, self.differences, loaded=False))


class CommandError(PeftBuffersError):
    """A command-line argument the command cannot act on; ``python -m peft_buffers`` prints it and exits 2.

    Example:
        >>> str(CommandError("README.md not found"))
        'README.md not found'
    """


class UnsupportedPeftVersion(PeftBuffersError, RuntimeError):
    """The installed PEFT release cannot be patched: outside the version registry, or its structure differs.

    ``differences`` names what differs from the registry entry (a binding site, a method, a signature); empty
    when the version itself is refused (older than the table, or a new major version).

    Example:
        >>> str(UnsupportedPeftVersion("0.5.0", ">=0.6.0, <0.23.0")).startswith("peft 0.5.0")
        True
        >>> print(UnsupportedPeftVersion("0.23.0", ">=0.6.0, <0.23.0", ["x has parameters (a,)"]))
        ... # doctest: +ELLIPSIS
        peft 0.23.0 is not supported by peft_buffers: it differs from the registry entry it would use: x has ...
    """

    def __init__(self, version: str, supported: str, differences: Sequence[str] = ()):
        self.version = version
        self.supported = supported
        self.differences = list(differences)
        if self.differences:
            shown = "; ".join(escape(d) for d in self.differences[:10])
            more = f" (and {len(self.differences) - 10} more)" if len(self.differences) > 10 else ""
            super().__init__(
                f"peft {version} is not supported by peft_buffers: it differs from the registry entry it would "
                f"use: {shown}{more}. Install a release of a tested line ({supported}), or call "
                f"peft_buffers.enable(allow_untested=True) to patch it anyway at your own risk."
            )
            return
        super().__init__(
            f"peft {version} is not supported by peft_buffers (supported: {supported}, and newer releases of the "
            f"same major version whose structure matches the newest entry). Install a supported peft release, or "
            f"call peft_buffers.enable(allow_untested=True) to use the newest registry entry at your own risk."
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
        return self.line()

    def line(self, fix_as_above: bool = False) -> str:
        """``- key: problem; expected ..., found .... Fix: ...`` (``Fix: as above`` when the line before says it)."""
        fix = "as above" if fix_as_above else escape(self.fix, limit=1000)
        return (f"- {escape(self.key)}: {escape(self.problem)}; expected {escape(self.expected)}, found "
                f"{escape(self.found)}. Fix: {fix}")


def _mismatch_lines(mismatches: Sequence[ExtraStateMismatch]) -> str:
    """The first :data:`SHOWN` mismatches, one per line, a fix said once for a run of lines sharing it; a count."""
    lines = [m.line(fix_as_above=i > 0 and m.fix == mismatches[i - 1].fix)
             for i, m in enumerate(mismatches[:SHOWN])]
    if len(mismatches) > SHOWN:
        lines.append(f"... and {len(mismatches) - SHOWN:,} more key(s)")
    return "\n".join(lines)


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
        lines = _mismatch_lines(self.mismatches)
        super().__init__(
            f"adapter {adapter_name!r}: {plural(len(self.mismatches), 'key')} of extra state (running statistics "
            f"or direct parameters) {'does' if len(self.mismatches) == 1 else 'do'} not fit the model; nothing was "
            f"loaded.\n{lines}"
        )


class CorruptAdapterFile(PeftBuffersError, ValueError):
    """An adapter weights file is unreadable or inconsistent (checked before PEFT touches the model).

    Example:
        >>> err = CorruptAdapterFile("/a/adapter_model.safetensors", "the file is empty", "at least 8 bytes",
        ...                          "0 bytes", "save the adapter again")
        >>> str(err).startswith("/a/adapter_model.safetensors: the file is empty")
        True
    """

    def __init__(self, path: str, problem: str, expected: str, found: str, fix: str):
        self.path, self.problem, self.expected, self.found, self.fix = str(path), problem, expected, found, fix
        super().__init__(
            f"{escape(path)}: {escape(problem)}; expected {escape(expected)}, found {escape(found)}. Nothing was "
            f"loaded. Fix: {escape(fix, limit=1000)}"
        )


class IncompatibleAdapterWeights(PeftBuffersError, RuntimeError):
    """Tensors of a state dict being loaded do not fit the model's tensors (shape, or dtype of another kind).

    Raised before anything is written. A ``RuntimeError`` like torch's own ``load_state_dict`` size-mismatch
    error, so code catching that keeps working. ``mismatches`` lists every key with expected, found and fix.

    Example:
        >>> err = IncompatibleAdapterWeights("", [ExtraStateMismatch(
        ...     "fc.lora_A.b.weight", "shape differs", "(2, 8)", "(4, 8)", "load it into a model with r=4")])
        >>> "fc.lora_A.b.weight" in str(err) and isinstance(err, RuntimeError)
        True
    """

    def __init__(self, where: str, mismatches: list[ExtraStateMismatch]):
        self.where = where
        self.mismatches = list(mismatches)
        lines = _mismatch_lines(self.mismatches)
        scope = f" into {escape(where)}" if where else ""
        super().__init__(
            f"{plural(len(self.mismatches), 'tensor')} of the state dict being loaded{scope} "
            f"{'does' if len(self.mismatches) == 1 else 'do'} not fit the model; nothing was written.\n{lines}"
        )


class RollbackFailed(PeftBuffersError, RuntimeError):
    """A load failed and restoring the model's earlier state failed too: the model may be changed.

    ``original`` is the exception of the load; ``__cause__`` the error of the rollback.

    Example:
        >>> err = RollbackFailed("adapter 'b' from /p", KeyError("k"))
        >>> isinstance(err.original, KeyError)
        True
    """

    def __init__(self, describe, original: BaseException):
        self.original = original
        super().__init__(
            f"{escape(describe or 'a load')} failed ({type(original).__name__}: {escape(original)}) and rolling the "
            f"model back failed as well: the model may be partly changed. Rebuild it (or reload the base model) "
            f"before use."
        )


class ConversionRefused(PeftBuffersError, ValueError):
    """``convert`` cannot make an adapter folder loadable by a PEFT release without changing the adapter.

    ``problems`` lists each reason (one line each: the file, the field, its value, what the release supports).

    Example:
        >>> str(ConversionRefused("0.6", ["a/adapter_config.json: field use_dora = true ..."])).splitlines()[0]
        'cannot convert for PEFT 0.6 without changing the adapter (1 problem):'
    """

    def __init__(self, target: str, problems: list[str]):
        self.target = target
        self.problems = list(problems)
        listed = listing((f"- {escape(problem, limit=1000)}" for problem in self.problems), what="problem(s)")
        super().__init__(f"cannot convert for PEFT {target} without changing the adapter "
                         f"({plural(len(self.problems), 'problem')}):\n{listed}")
