"""The base model an adapter was trained on, as recorded beside its file, and how another base differs from it.

Plain torch and JSON. A :class:`BaseIdentity` lists every tensor of the base model's state dict that the adapter
file does not carry itself: name (relative to the base model), dtype, shape, a fingerprint of its base value
(:mod:`._fingerprint`), and whether it is a quantized weight; plus the model's quantization description. It is
written as ``peft_buffers_base.json`` in the adapter folder (:func:`write_sidecar`), next to PEFT's files,
which it leaves as they are. :func:`base_differences` compares a recorded identity with the one of the base
an adapter is about to be loaded onto, in short grouped lines.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ._fingerprint import FINGERPRINT_FORMAT
from ._state import RUNNING_STAT_NAMES

__all__ = ["SIDECAR_NAME", "BaseIdentity", "TensorRecord", "base_differences", "describe_quantization",
           "read_sidecar", "write_sidecar"]

SIDECAR_NAME = "peft_buffers_base.json"
_FORMAT = "peft_buffers base identity"
_VERSION = 1
_SHOWN = 2  # example names per line


@dataclass(frozen=True)
class TensorRecord:
    """One base tensor: dtype (torch's name without ``torch.``), shape, fingerprint (None: not readable, e.g.
    on the meta device) and, for a quantized weight, what quantizes it (e.g. ``bitsandbytes 4-bit nf4``)."""

    dtype: str
    shape: tuple[int, ...]
    fingerprint: Optional[int]
    quantized: Optional[str] = None


@dataclass
class BaseIdentity:
    """What an adapter's base model was: its tensors (by name, in state-dict order) and its quantization.

    ``not_recorded`` names the base tensors left out, by reason (e.g. carried by the adapter file).

    Example:
        >>> identity = BaseIdentity({"fc.weight": TensorRecord("float32", (2, 2), 7)})
        >>> BaseIdentity.from_json(identity.to_json()) == identity
        True
        >>> identity.summary()
        '1 tensor (float32 1), not quantized'
    """

    tensors: dict[str, TensorRecord]
    quantization: Optional[dict[str, Any]] = None
    not_recorded: dict[str, list[str]] = field(default_factory=dict)
    fingerprint_format: str = FINGERPRINT_FORMAT

    def to_json(self) -> dict[str, Any]:
        groups: dict[tuple, dict[str, Optional[str]]] = {}
        for name, record in self.tensors.items():
            key = (record.dtype, record.shape, record.quantized)
            value = None if record.fingerprint is None else f"{record.fingerprint:016x}"
            groups.setdefault(key, {})[name] = value
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "fingerprint": self.fingerprint_format,
            "quantization": self.quantization,
            "tensor_count": len(self.tensors),
            "groups": [{"dtype": dtype, "shape": list(shape), "quantized": quantized, "tensors": tensors}
                       for (dtype, shape, quantized), tensors in groups.items()],
            "not_recorded": self.not_recorded,
        }

    @classmethod
    def from_json(cls, data: Any) -> BaseIdentity:
        """Read what :meth:`to_json` wrote; ``ValueError`` naming what is wrong otherwise."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a peft_buffers base identity (expected \"format\": \"{_FORMAT}\")")
        if data.get("version") != _VERSION:
            raise ValueError(f"base identity version {data.get('version')!r}; this peft_buffers reads version "
                             f"{_VERSION}: upgrade peft_buffers")
        tensors: dict[str, TensorRecord] = {}
        try:
            for group in data["groups"]:
                shape = tuple(int(n) for n in group["shape"])
                for name, value in group["tensors"].items():
                    tensors[str(name)] = TensorRecord(str(group["dtype"]), shape,
                                                      None if value is None else int(value, 16), group["quantized"])
            not_recorded = {str(k): [str(n) for n in v] for k, v in (data.get("not_recorded") or {}).items()}
            return cls(tensors, data.get("quantization"), not_recorded, str(data["fingerprint"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"malformed base identity ({type(error).__name__}: {error})") from None

    def summary(self) -> str:
        """One line: tensor count by dtype, quantization, what was left out."""
        dtypes = Counter(record.dtype for record in self.tensors.values())
        count = len(self.tensors)
        parts = [f"{count} tensor{'s' if count != 1 else ''} ("
                 + ", ".join(f"{dtype} {n}" for dtype, n in dtypes.most_common()) + ")",
                 describe_quantization(self.quantization)]
        parts += [f"{len(names)} {reason}" for reason, names in self.not_recorded.items() if names]
        return ", ".join(parts)


def describe_quantization(description: Optional[dict[str, Any]]) -> str:
    """A quantization description in words.

    Example:
        >>> describe_quantization({"method": "bitsandbytes", "bits": 4, "quant_type": "nf4",
        ...                        "compute_dtype": "float32", "double_quant": False, "storage": "uint8"})
        'bitsandbytes 4-bit nf4, compute dtype float32'
        >>> describe_quantization(None)
        'not quantized'
    """
    if not description:
        return "not quantized"
    method = description.get("method", "quantized")
    if method == "bitsandbytes":
        bits = description.get("bits")
        words = f"bitsandbytes {bits}-bit" if bits else "bitsandbytes"
        if bits == 4:
            words += f" {description.get('quant_type')}, compute dtype {description.get('compute_dtype')}"
            if description.get("double_quant"):
                words += ", double quant"
            if description.get("storage") not in (None, "uint8"):
                words += f", storage {description.get('storage')}"
        return words
    settings = description.get("settings") or {}
    shown = ", ".join(f"{k}={v}" for k, v in list(settings.items())[:6])
    return f"{method} ({shown})" if shown else str(method)


def _shown(name: str) -> str:
    return name if name.isprintable() else ascii(name)[1:-1]


def _examples(names: list[str], limit: int = _SHOWN, more: bool = True) -> str:
    shown = ", ".join(_shown(n) for n in names[:limit])
    return shown if len(names) <= limit or not more else f"{shown} and {len(names) - limit} more"


def _tensors(count: int) -> str:
    return f"{count} tensor{'s' if count != 1 else ''}"


def base_differences(recorded: BaseIdentity, live: BaseIdentity) -> list[str]:
    """How ``live`` (the base an adapter is loaded onto) differs from ``recorded``, one short line per kind.

    Empty when they are the same. Tensors quantized differently are explained by the quantization line;
    tensors of another dtype or shape are not compared by value; a fingerprint of another definition or
    None (nothing readable) is not compared.

    Example:
        >>> trained = BaseIdentity({"fc.weight": TensorRecord("float32", (2, 2), 1),
        ...                         "bn.running_mean": TensorRecord("float32", (2,), 2)})
        >>> here = BaseIdentity({"fc.weight": TensorRecord("float32", (2, 2), 1),
        ...                      "bn.running_mean": TensorRecord("float32", (2,), 3)})
        >>> base_differences(trained, here)
        ['running statistics differ: bn.running_mean (the adapter does not carry them)']
    """
    lines: list[str] = []
    total = len(recorded.tensors)
    if (recorded.quantization or None) != (live.quantization or None):
        was, now = recorded.quantization, live.quantization
        if was and not now:
            lines.append(f"trained with {describe_quantization(was)}; this base is not quantized")
        elif now and not was:
            lines.append(f"trained without quantization; this base: {describe_quantization(now)}")
        else:
            lines.append(f"trained with {describe_quantization(was)}; this base: {describe_quantization(now)}")
    compare_values = recorded.fingerprint_format == live.fingerprint_format
    dtypes: dict[tuple[str, str], list[str]] = {}
    shapes, missing, quantized, values, statistics = [], [], [], [], []
    for name, was in recorded.tensors.items():
        now = live.tensors.get(name)
        if now is None:
            missing.append(name)
        elif was.quantized != now.quantized:
            quantized.append(f"{_shown(name)}: {was.quantized or 'not quantized'} when trained, "
                             f"{now.quantized or 'not quantized'} here")
        elif was.dtype != now.dtype:
            dtypes.setdefault((was.dtype, now.dtype), []).append(name)
        elif was.shape != now.shape:
            shapes.append(f"{_shown(name)}: {was.shape} when trained, {now.shape} here")
        elif compare_values and None not in (was.fingerprint, now.fingerprint) and was.fingerprint != now.fingerprint:
            (statistics if name.rsplit(".", 1)[-1] in RUNNING_STAT_NAMES else values).append(name)
    if quantized and not lines:  # same description, but not the same layers
        lines.append(f"{_tensors(len(quantized))} quantized differently, e.g. {quantized[0]}")
    for (was_dtype, now_dtype), names in dtypes.items():
        examples = f", e.g. {_examples(names, more=False)}" if len(names) < total else ""
        lines.append(f"trained on {was_dtype} weights, loading onto {now_dtype} ({_tensors(len(names))}{examples})")
    if shapes:
        lines.append(f"{_tensors(len(shapes))} of another shape, e.g. {shapes[0]}")
    left_out = {name for names in recorded.not_recorded.values() for name in names}
    extra = [name for name in live.tensors if name not in recorded.tensors and name not in left_out]
    if missing:
        lines.append(f"{_tensors(len(missing))} of the trained base are not in this base, e.g. {_examples(missing)}")
    if extra:
        lines.append(f"{_tensors(len(extra))} of this base were not in the trained base, e.g. {_examples(extra)}")
    if values:
        lines.append(f"{len(values)} of {total} tensors differ in value, e.g. {_examples(values, more=False)}: "
                     f"was the adapter trained on another base or revision?")
    if statistics:
        lines.append(f"running statistics differ: {_examples(statistics, 3)} (the adapter does not carry them)")
    return lines


def read_sidecar(folder: Union[str, os.PathLike]) -> Optional[BaseIdentity]:
    """The identity recorded in ``folder`` (an adapter folder), or None when it has none.

    Raises ``ValueError`` when the file is there but cannot be read as one.

    Example:
        >>> read_sidecar("/nonexistent") is None
        True
    """
    path = Path(folder) / SIDECAR_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    try:
        return BaseIdentity.from_json(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _dumps(data: dict[str, Any]) -> str:
    """JSON with one line per tensor and per group header: readable, diffable, compact."""
    one = json.dumps
    lines = ["{"]
    for key, value in data.items():
        if key != "groups":
            lines.append(f" {one(key)}: {one(value)},")
            continue
        lines.append(' "groups": [')
        for index, group in enumerate(value):
            head = {k: v for k, v in group.items() if k != "tensors"}
            lines.append(f"  {one(head)[:-1]}, \"tensors\": {{")
            items = list(group["tensors"].items())
            lines += [f"   {one(name)}: {one(fp)}{',' if i < len(items) - 1 else ''}" for i, (name, fp) in
                      enumerate(items)]
            lines.append("  }}" + ("," if index < len(value) - 1 else ""))
        lines.append(" ],")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines + ["}"]) + "\n"


def write_sidecar(folder: Union[str, os.PathLike], identity: BaseIdentity) -> Path:
    """Write ``identity`` to ``folder``/``peft_buffers_base.json`` (a temporary file renamed into place).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> path = write_sidecar(folder, BaseIdentity({"w": TensorRecord("float16", (3,), 5)}))
        >>> read_sidecar(folder).tensors["w"].fingerprint
        5
    """
    path = Path(folder) / SIDECAR_NAME
    # created like any file (the umask's permissions, unlike mkstemp's 0600), renamed into place when complete
    temporary = path.with_name(f".{SIDECAR_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(_dumps(identity.to_json()))
        os.replace(temporary, path)
    except BaseException:
        if temporary.exists():
            temporary.unlink()
        raise
    return path
