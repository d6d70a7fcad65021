"""``python -m peft_buffers inspect DIR``: what an adapter file carries, with bytes.

Works on the file alone (no model). Every key that writes into a base-model tensor is listed under its kind,
so a user sees what a file will change before loading it:

* adapter tensors: the tuner's own (key prefixes such as ``lora_``, ``modules_to_save`` copies, prompts);
* base tensors PEFT saves itself: biases with ``bias="all"``, or ``"lora_only"`` for layers the adapter wraps;
* running statistics, recognised by their names;
* changed buffers: other buffers training moves, recognised by torch's names for them (spectral norm,
  quantization observers and fake-quant modules) or by an integer dtype;
* direct parameters: every other base-model tensor (a buffer of a third-party module that has none of those
  names is listed here too: a file alone does not say whether a tensor is a parameter or a buffer).

When the folder records the base model the adapter was trained on (``peft_buffers_base.json``, written by
``save_pretrained`` with peft_buffers enabled), a last line summarises it: tensor count by dtype, quantization,
and what the record leaves out (the tensors the file carries itself).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from .._errors import escape
from ..core import RUNNING_STAT_NAMES, SIDECAR_NAME, read_sidecar
from ._common import print_error

__all__ = ["HELP", "AdapterFileSummary", "add_arguments", "inspect_adapter", "run"]

HELP = "list what adapter file(s) carry, with bytes"

_TUNER_PREFIXES = ("lora_", "hada_", "lokr_", "ia3_", "oft_", "boft_", "vera_", "fourierft_", "ln_tuning_",
                   "vblora_", "hra_", "bone_", "randlora_", "shira_", "c3a_", "road_", "miss_", "waveft_")
# torch's names of buffers that training moves: spectral norm (both APIs), observers and fake-quant modules.
_BUFFER_NAMES = ("_u", "_v", "weight_u", "weight_v", "scale", "zero_point", "min_val", "max_val", "min_vals",
                 "max_vals", "histogram", "fake_quant_enabled", "observer_enabled", "eps")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")  # read with torch.load(weights_only=True)
_INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class AdapterFileSummary:
    """The tensors of one adapter file, sorted by what they write into (see the module docstring)."""

    path: Path
    file_bytes: int
    adapter: list[TensorInfo] = field(default_factory=list)
    peft_base: list[TensorInfo] = field(default_factory=list)
    running_stats: dict[str, list[TensorInfo]] = field(default_factory=dict)
    buffers: list[TensorInfo] = field(default_factory=list)
    direct: list[TensorInfo] = field(default_factory=list)
    base: Optional[str] = None  # the recorded base model, summarised (None: the folder records none)

    def render(self) -> str:
        def total(infos):
            return sum(i.nbytes for i in infos)

        def listed(title: str, infos: list[TensorInfo]) -> list[str]:
            head = [f"  {title:<21}{_tensors(infos)} {total(infos):14,d} bytes"]
            return head + [f"    {i.key}  {list(i.shape)} {i.dtype}  {i.nbytes:,} bytes" for i in infos]

        stats = [i for infos in self.running_stats.values() for i in infos]
        modules = len(self.running_stats)
        lines = [
            f"{self.path}: {self.file_bytes:,} bytes on disk",
            f"  adapter tensors      {_tensors(self.adapter)} {total(self.adapter):14,d} bytes",
        ]
        if self.peft_base:
            lines += listed("base tensors (PEFT)", self.peft_base)
        lines.append(f"  running statistics   {_tensors(stats)} {total(stats):14,d} bytes "
                     f"in {_plural(modules, 'module')}")
        for module, infos in sorted(self.running_stats.items()):
            present = {i.key.rsplit(".", 1)[1] for i in infos}
            names = ", ".join(n for n in RUNNING_STAT_NAMES if n in present)
            lines.append(f"    {module}  [{names}]  {total(infos):,} bytes")
        lines += listed("changed buffers", self.buffers)
        lines += listed("direct parameters", self.direct)
        if self.base is not None:
            lines.append(f"  base model ({SIDECAR_NAME}): {self.base}")
        return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _tensors(infos: list[TensorInfo]) -> str:
    return f"{len(infos):6d} {'tensor ' if len(infos) == 1 else 'tensors'}"


def _read_tensor_infos(path: Path) -> list[TensorInfo]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        infos = []
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shape = tuple(tensor_slice.get_shape())
                dtype = tensor_slice.get_dtype()
                count = 1
                for dim in shape:
                    count *= dim
                infos.append(TensorInfo(key, shape, dtype, count * _DTYPE_BYTES.get(dtype, 0)))
        return infos
    if path.suffix == ".json":
        raise ValueError(f"{path.name} is a config file, not adapter weights: pass the adapter folder "
                         f"({path.parent}) or its adapter_model.safetensors / adapter_model.bin")
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"{path.name} is not an adapter weights file (.safetensors, or .bin from torch.save): "
                         f"pass the adapter folder or its adapter_model.safetensors")
    import torch

    try:
        state = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch's text asks to file an issue with torch: say what it means
        # torch's own cause, without its advice (weights_only=False, filing an issue): the unpickler's line
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        detail = found.group(1).strip() if found else str(error).strip().splitlines()[0]
        raise ValueError(f"not a weights file torch.load reads with weights_only=True ({detail}): pass the "
                         f"adapter folder or its adapter_model.safetensors") from error
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict of tensors")
    return [
        TensorInfo(k, tuple(v.shape), str(v.dtype).replace("torch.", ""), v.numel() * v.element_size())
        for k, v in state.items()
    ]


def _peft_saves_bias(key: str, bias: str, wrapped: set[str]) -> bool:
    """Whether PEFT itself saves this ``*.bias`` key: every bias with ``bias="all"``; with ``"lora_only"``
    (or a tuner's own ``"<tuner>_only"``) only those of layers the adapter wraps."""
    if not key.endswith(".bias") or bias in (None, "none"):
        return False
    if bias == "all":
        return True
    module = key[: -len(".bias")]
    return module.removesuffix(".base_layer") in wrapped


def inspect_adapter(directory: str | Path) -> AdapterFileSummary:
    """Read an adapter directory (or file) and sort its tensors.

    Raises ``OSError`` / ``ValueError`` when no adapter file is there or it cannot be read.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"base_model.model.bn.running_mean": torch.zeros(4),
        ...            "base_model.model.fc.lora_A.weight": torch.zeros(2, 4)}, d + "/adapter_model.safetensors")
        >>> summary = inspect_adapter(d)
        >>> list(summary.running_stats), [i.key for i in summary.adapter]
        (['base_model.model.bn'], ['base_model.model.fc.lora_A.weight'])
    """
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError("no such file or directory")
    if path.is_dir():
        candidates = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {escape(path)}")
        config_path: Optional[Path] = path / "adapter_config.json"
        path = found
    else:
        config_path = path.parent / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    modules_to_save = tuple(config.get("modules_to_save") or ())
    infos = _read_tensor_infos(path)
    wrapped = {i.key.split("." + p)[0] for i in infos for p in i.key.split(".") if p.startswith(_TUNER_PREFIXES)}
    summary = AdapterFileSummary(path=path, file_bytes=path.stat().st_size)
    try:
        recorded = read_sidecar(path.parent)
        summary.base = recorded.summary() if recorded is not None else None
    except ValueError as error:
        summary.base = f"unreadable: {error}"
    for info in infos:
        parts = info.key.split(".")
        base_key = info.key.removeprefix("base_model.model.")
        in_saved_module = any(f".{m}." in f".{base_key}" for m in modules_to_save)
        if parts[-1] in RUNNING_STAT_NAMES and not in_saved_module:
            module = info.key.rsplit(".", 1)[0]  # named in full, as every other listed key
            summary.running_stats.setdefault(module, []).append(info)
        elif (
            any(p.startswith(_TUNER_PREFIXES) for p in parts)
            or in_saved_module
            or "prompt_encoder" in parts
            or info.key.startswith("prompt_embeddings")
        ):
            summary.adapter.append(info)
        elif _peft_saves_bias(info.key, config.get("bias", "none"), wrapped):
            summary.peft_base.append(info)
        elif parts[-1] in _BUFFER_NAMES or info.dtype in _INTEGER_DTYPES:
            summary.buffers.append(info)
        else:
            summary.direct.append(info)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``DIR [DIR ...]``: adapter directories (or adapter files).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> parser.parse_args(["a", "b"]).dirs
        ['a', 'b']
    """
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="an adapter directory (adapter_model.safetensors or .bin inside) or the file itself")


def run(args: argparse.Namespace, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Print the summary of each adapter directory; exit status 1 if any cannot be read.

    Example:
        >>> run(argparse.Namespace(dirs=["/nonexistent"]), err=sys.stdout)
        python -m peft_buffers inspect: error: cannot read /nonexistent: no such file or directory
        1
    """
    out, err = out or sys.stdout, err or sys.stderr
    status = 0
    for directory in args.dirs:
        try:
            print(inspect_adapter(directory).render(), file=out)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            print_error("inspect", f"cannot read {directory}: {exc}", file=err)
            status = 1
    return status
