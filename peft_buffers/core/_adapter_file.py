"""Checks made before PEFT touches the model (issue 10): the adapter file, then each tensor against the model.

- :func:`check_adapter_path` / :func:`check_safetensors_file`: the safetensors header of an adapter file is
  readable and consistent (length, JSON, dtypes, shapes, data offsets exactly tiling the data section), read
  from the header alone, without loading any tensor.
- :func:`check_state_dict_fits`: every tensor a ``load_state_dict`` call is about to write has the live
  tensor's shape and a dtype of the same kind. :func:`peft_buffers.core.atomic` runs it inside its
  interception of ``load_state_dict``, so the keys are the ones PEFT itself produced (adapter name inserted,
  ``modules_to_save`` keys remapped): no PEFT renaming is re-implemented here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .._errors import CorruptAdapterFile, ExtraStateMismatch, IncompatibleAdapterWeights
from ._load_plan import _dtype_kind
from ._publish import check_folder_complete

__all__ = ["TensorHeader", "check_adapter_path", "check_safetensors_file", "check_state_dict_fits",
           "find_weights_file", "verify_adapter_path"]

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors reader itself

# bits per element of every dtype the safetensors format defines
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

_FIX_FILE = (
    "the file is damaged or incomplete (an interrupted save or copy): save the adapter again with "
    "save_pretrained(), or copy the complete file"
)
_FIX_SHAPE = (
    "load the file into a model built as in training (same base architecture and adapter config: r, "
    "target_modules, modules_to_save), or pass ignore_mismatched_sizes=True to skip such keys"
)
_FIX_KIND = "convert the tensor in the file to a dtype of the same kind as the model's, or rebuild the model"


@dataclass(frozen=True)
class TensorHeader:
    """One tensor entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def find_weights_file(model_id: Union[str, os.PathLike], subfolder: Optional[str] = None) -> Optional[Path]:
    """The local adapter weights file PEFT would read for ``model_id``, or None (a Hub id, or no such file).

    Example:
        >>> find_weights_file("some-user/some-hub-adapter") is None
        True
    """
    path = Path(model_id)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (path / name).is_file():
            return path / name
    return None


def _corrupt(path: Path, problem: str, expected: str, found: str) -> CorruptAdapterFile:
    return CorruptAdapterFile(str(path), problem, expected, found, _FIX_FILE)


def check_safetensors_file(path: Union[str, os.PathLike]) -> dict[str, TensorHeader]:
    """Read and check the header of a safetensors file; return its tensor entries (key -> TensorHeader).

    Raises :class:`~peft_buffers.CorruptAdapterFile` naming the file, the problem, expected and found.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_file({"w": torch.zeros(2, 3)}, f"{folder}/adapter_model.safetensors")
        ...     check_safetensors_file(f"{folder}/adapter_model.safetensors")["w"].shape
        (2, 3)
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(path, "the file is too short to hold a safetensors header",
                       "at least 8 bytes (the header length)", f"{size} bytes")
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, "the header length is implausibly large", f"at most {MAX_HEADER_BYTES} bytes",
                           f"{header_len} bytes")
        if 8 + header_len > size:
            raise _corrupt(path, "the header length runs past the end of the file",
                           f"at most {size - 8} bytes (file size {size} - 8)", f"{header_len} bytes")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, "the header is not valid UTF-8 JSON (is the header length too small?)",
                       f"a JSON object in bytes 8..{8 + header_len}", f"{type(error).__name__}: {error}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object", "an object {name: {dtype, shape, data_offsets}}",
                       type(header).__name__)
    entries = _entries(path, header)
    _check_tiling(path, entries, size - 8 - header_len)
    return entries


def _entries(path: Path, header: dict[str, Any]) -> dict[str, TensorHeader]:
    entries: dict[str, TensorHeader] = {}
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _corrupt(path, "the __metadata__ entry is malformed", "a mapping of strings to strings",
                               repr(info)[:80])
            continue
        if not isinstance(info, dict):
            raise _corrupt(path, f"the entry of tensor {key!r} is not an object", "{dtype, shape, data_offsets}",
                           repr(info)[:80])
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise _corrupt(path, f"tensor {key!r} has an unknown dtype", f"one of {sorted(DTYPE_BITS)}",
                           repr(dtype))
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _corrupt(path, f"tensor {key!r} has a malformed shape", "a list of non-negative integers",
                           repr(shape)[:80])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {key!r} has malformed data_offsets", "[begin, end] with 0 <= begin <= end",
                           repr(offsets)[:80])
        numel = 1
        for dim in shape:
            numel *= dim
        bits = numel * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _corrupt(path, f"tensor {key!r}: its byte size does not match dtype x shape",
                           f"{bits / 8:g} bytes ({dtype} x {tuple(shape)})", f"{offsets[1] - offsets[0]} bytes "
                           f"(data_offsets {offsets})")
        entries[key] = TensorHeader(dtype, tuple(shape), offsets[0], offsets[1])
    return entries


def _check_tiling(path: Path, entries: dict[str, TensorHeader], data_len: int) -> None:
    """The tensors must cover the data section exactly: contiguous, non-overlapping, nothing after the last."""
    position = 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise _corrupt(path, f"tensor {key!r} {problem} in the data section", f"data starting at byte {position}",
                           f"data_offsets [{entry.begin}, {entry.end}]")
        position = entry.end
    if position != data_len:
        problem = "the data section is shorter than the header says (truncated file?)" if position > data_len else \
            "the data section has bytes no tensor accounts for"
        raise _corrupt(path, problem, f"{position} bytes of tensor data", f"{data_len} bytes")


def check_adapter_path(model_id: Union[str, os.PathLike], subfolder: Optional[str] = None
                       ) -> Optional[dict[str, TensorHeader]]:
    """Check the local adapter weights file of ``model_id`` before loading; its safetensors entries, or None.

    None when there is nothing local to check (a Hub id) or the file is a pickle (``adapter_model.bin``: only
    its non-emptiness is checked; torch reads the rest). Raises :class:`~peft_buffers.CorruptAdapterFile`, also
    when a save into the folder was interrupted between moving two of its files into place.

    Example:
        >>> check_adapter_path("some-user/some-hub-adapter") is None
        True
    """
    _check_folder(model_id, subfolder)
    path = find_weights_file(model_id, subfolder)
    if path is None:
        return None
    if path.suffix != ".safetensors":
        if path.stat().st_size == 0:
            raise _corrupt(path, "the file is empty", "a torch.save() archive", "0 bytes")
        return None
    return check_safetensors_file(path)


def _check_folder(model_id: Union[str, os.PathLike], subfolder: Optional[str]) -> None:
    """An interrupted save left files of two saves in the folder: refused (one ``stat`` when no save was)."""
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    if folder.is_dir():
        check_folder_complete(folder)


def verify_adapter_path(model_id: Union[str, os.PathLike], subfolder: Optional[str] = None) -> None:
    """Like :func:`check_adapter_path`, at C speed when the file is sound: safetensors' own reader validates the
    header (JSON, dtypes, shapes, offsets tiling the data exactly); only a file it refuses is read again by
    :func:`check_safetensors_file`, for a :class:`~peft_buffers.CorruptAdapterFile` that names the problem.

    Example:
        >>> verify_adapter_path("some-user/some-hub-adapter")  # nothing local: nothing to check
    """
    path = find_weights_file(model_id, subfolder)
    if path is None or path.suffix != ".safetensors":
        check_adapter_path(model_id, subfolder)
        return
    _check_folder(model_id, subfolder)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return
    except Exception as error:  # noqa: BLE001 - any refusal: find out exactly what is wrong
        check_safetensors_file(path)
        raise _corrupt(path, "safetensors cannot read the file", "a file safetensors reads",
                       f"{type(error).__name__}: {error}") from None


def _shape_fits(live: torch.Tensor, value: torch.Tensor) -> bool:
    if tuple(live.shape) == tuple(value.shape):
        return True
    if live.dim() == 0 and tuple(value.shape) == (1,):
        return True  # torch's load_state_dict accepts a 1-element tensor for a 0-dim one (old checkpoints)
    # 4-bit quantized weights pack two values per byte (the same exemption as PEFT's and transformers')
    return live.dim() > 0 and live.shape[-1] == 1 and live.numel() * 2 == value.numel()


def _loads_its_own_way(module: nn.Module, key: str) -> bool:
    """Whether a module on ``key``'s path has load pre-hooks or its own ``_load_from_state_dict`` (other than
    the norm layers', which only upgrade old ``num_batches_tracked`` keys)."""
    for part in ["", *key.split(".")[:-1]]:
        if part:
            module = module._modules.get(part) if isinstance(module, nn.Module) else None
            if module is None:
                return False
        if module._load_state_dict_pre_hooks:
            return True
        loader = type(module)._load_from_state_dict
        if loader is not nn.Module._load_from_state_dict and not isinstance(module, nn.modules.batchnorm._NormBase):
            return True
    return False


def check_state_dict_fits(module: nn.Module, state_dict: Mapping[str, Any], live: Mapping[str, torch.Tensor],
                          assign: bool = False) -> None:
    """Raise :class:`~peft_buffers.IncompatibleAdapterWeights` if a tensor would not fit its live tensor.

    ``live`` maps the keys of ``state_dict`` that name a tensor of ``module`` to that tensor (keys naming
    nothing are not written by torch and are not checked here). A shape that differs, or a dtype of another
    kind (float / integer / bool / complex), is a mismatch; float16 into float32 is not.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> check_state_dict_fits(layer, {"bias": torch.zeros(3)}, {"bias": layer.bias})
        >>> try:
        ...     check_state_dict_fits(layer, {"bias": torch.zeros(4)}, {"bias": layer.bias})
        ... except IncompatibleAdapterWeights as error:
        ...     print(error.mismatches[0].expected, "/", error.mismatches[0].found)
        shape (3,) / shape (4,)
    """
    mismatches = []
    for key, target in live.items():
        value = state_dict.get(key)
        if not isinstance(value, torch.Tensor) or is_lazy(target):
            continue  # torch reports non-tensors itself; lazy tensors take the incoming shape
        if _loads_its_own_way(module, key):
            continue  # a load hook or a module's own loader may reshape (AdaMSS' subspaces): torch decides
        if not _shape_fits(target, value):
            mismatches.append(ExtraStateMismatch(key, "shape differs from the model's tensor",
                                                 f"shape {tuple(target.shape)}", f"shape {tuple(value.shape)}",
                                                 _FIX_SHAPE))
        elif _dtype_kind(target.dtype) != _dtype_kind(value.dtype):
            mismatches.append(ExtraStateMismatch(key, "dtype of another kind than the model's tensor",
                                                 f"a {_dtype_kind(target.dtype)} dtype like {target.dtype}",
                                                 str(value.dtype), _FIX_KIND))
    if mismatches:
        raise IncompatibleAdapterWeights(type(module).__name__, mismatches)
