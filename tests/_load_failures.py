"""Tiny models and failing adapter folders for the atomic-load tests (issue 10 §1, `issues show 10`).

Each case function writes the adapter folder of "b" (or of "default", for the existing-adapter case) into
``folder`` and returns the exception type a load of it raises inside a transaction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_buffers import IncompatibleExtraState
from tests.zoo import MixedNorms

ADAPTER_FILE = "adapter_model.safetensors"


class Net(nn.Module):
    """The model of issue 10: fc1 -> bn1 -> mid -> bn2 -> head."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.mid = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.mid(torch.relu(self.bn1(self.fc1(x)))))))


class FlatMixedNorms(MixedNorms):
    def forward(self, x):
        return super().forward(x.reshape(-1, 3, 2, 2).repeat(1, 1, 4, 4))


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], nn.Module]
    in_features: int
    default_targets: tuple[str, ...]  # adapter "default", already in the model
    new_target: str  # a layer no other adapter targets
    norm: str  # a BatchNorm for modules_to_save

    def base(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make()

    def inputs(self) -> torch.Tensor:
        return torch.randn(6, self.in_features, generator=torch.Generator().manual_seed(3))


SPECS = {
    "net": Spec("net", Net, 4, ("fc1",), "mid", "bn2"),
    "mixed_norms": Spec("mixed_norms", FlatMixedNorms, 12, ("fc1",), "fc2", "bn1d"),
}


def _train(model: nn.Module, spec: Spec) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(2):
        model(spec.inputs() * (step + 2)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def model_with_default(spec: Spec) -> nn.Module:
    """A trained PEFT model in eval mode holding adapter "default" (LoRA on the default targets)."""
    model = get_peft_model(spec.base(), LoraConfig(r=2, lora_alpha=4, target_modules=list(spec.default_targets)))
    _train(model, spec)
    return model


def save_adapter(spec: Spec, folder: Path, **config) -> Path:
    model = get_peft_model(spec.base(), LoraConfig(r=2, lora_alpha=4, **config))
    _train(model, spec)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _rewrite(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(folder / ADAPTER_FILE))
    edit(tensors)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})


def _key(tensors: dict, *parts: str) -> str:
    return next(k for k in tensors if all(p in k for p in parts))


def _header_len(folder: Path) -> int:
    return int.from_bytes((folder / ADAPTER_FILE).read_bytes()[:8], "little")


def _set_header_len(folder: Path, value: int) -> None:
    data = bytearray((folder / ADAPTER_FILE).read_bytes())
    data[:8] = value.to_bytes(8, "little")
    (folder / ADAPTER_FILE).write_bytes(bytes(data))


# --------------------------------------------------------------------------- the failure cases of issue 10 §1
# Each builds the adapter folder for "b" and names the exception the load raises with the transaction.


def refused_new_layer(spec, folder):
    """A config targeting a layer no other adapter targets, with a file peft_buffers refuses."""
    save_adapter(spec, folder, target_modules=[spec.new_target])
    _rewrite(folder, lambda t: t.update({f"base_model.model.{spec.norm}.running_mean": torch.zeros(5)}))
    return IncompatibleExtraState


def refused_modules_to_save(spec, folder):
    """A config with modules_to_save=[a BatchNorm], with a file peft_buffers refuses."""
    save_adapter(spec, folder, target_modules=[spec.new_target], modules_to_save=[spec.norm])
    other_norm = "bn1" if spec.norm == "bn2" else "bn2d"
    _rewrite(folder, lambda t: t.update({f"base_model.model.{other_norm}.running_var": torch.ones(3)}))
    return IncompatibleExtraState


def truncated(spec, folder):
    save_adapter(spec, folder, target_modules=[spec.new_target])
    data = (folder / ADAPTER_FILE).read_bytes()
    (folder / ADAPTER_FILE).write_bytes(data[: len(data) - 20])
    return Exception


def header_too_large(spec, folder):
    save_adapter(spec, folder, target_modules=[spec.new_target])
    _set_header_len(folder, (folder / ADAPTER_FILE).stat().st_size)
    return Exception


def header_too_small(spec, folder):
    save_adapter(spec, folder, target_modules=[spec.new_target])
    _set_header_len(folder, _header_len(folder) - 7)
    return Exception


def empty_file(spec, folder):
    save_adapter(spec, folder, target_modules=[spec.new_target])
    (folder / ADAPTER_FILE).write_bytes(b"")
    return Exception


def wrong_shape_lora_weight(spec, folder):
    save_adapter(spec, folder, target_modules=[spec.new_target])
    _rewrite(folder, lambda t: t.update({_key(t, "lora_B"): torch.zeros(t[_key(t, "lora_B")].shape[0], 3)}))
    return RuntimeError


def wrong_shape_modules_to_save_statistic(spec, folder):
    save_adapter(spec, folder, target_modules=[spec.new_target], modules_to_save=[spec.norm])
    _rewrite(folder, lambda t: t.update({_key(t, spec.norm, "running_mean"): torch.zeros(5)}))
    return RuntimeError


def wrong_shape_into_existing_adapter(spec, folder):
    """A file for adapter "default" (loaded under that name) whose second LoRA weight has the wrong shape."""
    save_adapter(spec, folder, target_modules=list(spec.default_targets))

    def edit(tensors):
        lora_a, lora_b = _key(tensors, "lora_A"), _key(tensors, "lora_B")
        tensors[lora_a] = tensors[lora_a] + 1  # differs from the live adapter: a partial write shows
        tensors[lora_b] = torch.zeros(tensors[lora_b].shape[0], 3)

    _rewrite(folder, edit)
    return RuntimeError


NEW_ADAPTER_CASES = [refused_new_layer, refused_modules_to_save, truncated, header_too_large, header_too_small,
                     empty_file, wrong_shape_lora_weight, wrong_shape_modules_to_save_statistic]
CASES = NEW_ADAPTER_CASES + [wrong_shape_into_existing_adapter]
NEEDS_ENABLED = {refused_new_layer, refused_modules_to_save}  # refused by peft_buffers' own load


MODULES_TO_SAVE_CASES = {refused_modules_to_save, wrong_shape_modules_to_save_statistic}


@functools.cache
def _peft_adds_a_modules_to_save_adapter() -> bool:
    """False on PEFT releases (0.6) whose add_adapter crashes (AttributeError on ``None.update``) when the
    model's first adapter has no modules_to_save: there the load fails inside PEFT, before our refusal."""
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["fc1"]))
    try:
        model.add_adapter("x", LoraConfig(r=2, target_modules=["mid"], modules_to_save=["bn2"]))
    except AttributeError:
        return False
    return True


def b_config(spec: Spec) -> dict:
    """Adapter "b" of the success and fuzz tests: LoRA on the new layer, its BatchNorm in modules_to_save
    where PEFT can add such an adapter next to "default"."""
    extra = {"modules_to_save": [spec.norm]} if _peft_adds_a_modules_to_save_adapter() else {}
    return {"target_modules": [spec.new_target], **extra}


def expected_for(case, expected):
    if case in MODULES_TO_SAVE_CASES and not _peft_adds_a_modules_to_save_adapter():
        return AttributeError  # PEFT's own failure; the rollback is checked all the same
    return expected


def adapter_name_of(case) -> str:
    return "default" if case is wrong_shape_into_existing_adapter else "b"
