"""Tiny models and adapter configs shared by the tests (random init from configs; no network).

Each :class:`ModelSpec` builds the same base model every time (seeded), so a "fresh base" in a reload test
has exactly the weights the trained model started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return fn()

    return make


class MixedNorms(nn.Module):
    """BatchNorm1d, cumulative-average BatchNorm2d (momentum=None), InstanceNorm with stats, GroupNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(8, momentum=None)  # cumulative average: depends on num_batches_tracked
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.gnorm = nn.GroupNorm(2, 8)  # no running statistics: nothing to save
        self.fc1 = nn.Linear(8, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.gnorm(self.inorm(torch.relu(self.bn2d(self.conv(x)))))
        x = x.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.bn1d(self.fc1(x))))


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return ResNetForImageClassification(config)


def _mobilenet():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=3, tf_padding=False)
    return MobileNetV2ForImageClassification(config)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    make: Callable[[], nn.Module]
    image_size: int
    targets: tuple[str, ...]  # LoRA-family target modules (suffix match, works on every PEFT line)
    feedforward: tuple[str, ...] = ()  # IA3 feedforward modules (subset of targets)

    def inputs(self, seed: int = 1, batch: int = 4) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)


ZOO = {
    "resnet": ModelSpec("resnet", _seeded(_resnet), 32, ("convolution",), ("convolution",)),
    "mobilenet_v2": ModelSpec(
        "mobilenet_v2", _seeded(_mobilenet), 32, ("expand_1x1.convolution", "reduce_1x1.convolution"),
        ("expand_1x1.convolution",),
    ),
    "mixed_norms": ModelSpec("mixed_norms", _seeded(MixedNorms), 8, ("conv", "fc1", "fc2"), ("fc1",)),
    "vit": ModelSpec("vit", _seeded(_vit), 16, ("q_proj", "v_proj", "query", "value"), ()),
}


def tuner_config(tuner: str, spec: ModelSpec, **overrides):
    """A small adapter config of the given PEFT method for ``spec``'s target modules."""
    import peft

    targets = list(spec.targets)
    if tuner == "lora":
        kwargs = {"r": 2, "lora_alpha": 4, "target_modules": targets}
        return peft.LoraConfig(**{**kwargs, **overrides})
    if tuner == "loha":
        return peft.LoHaConfig(**{"r": 2, "alpha": 4, "target_modules": targets, **overrides})
    if tuner == "lokr":
        return peft.LoKrConfig(**{"r": 2, "alpha": 4, "target_modules": targets, **overrides})
    if tuner == "ia3":
        kwargs = {"target_modules": targets, "feedforward_modules": list(spec.feedforward)}
        return peft.IA3Config(**{**kwargs, **overrides})
    raise ValueError(tuner)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)


def train(model: nn.Module, spec: ModelSpec, steps: int = 3, seed: int = 1, lr: float = 0.05) -> None:
    """A few SGD steps in train mode on seeded random batches (moves BatchNorm statistics)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    for step in range(steps):
        x = spec.inputs(seed=seed + step) * 2 + 0.5  # shifted inputs: statistics move visibly
        loss = logits(model, x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def unfreeze_embeddings(peft_model: nn.Module) -> list[str]:
    """Make the ViT's position embeddings and cls token trainable (PEFT issue #2099's use case)."""
    embeddings = peft_model.get_base_model().vit.embeddings
    embeddings.position_embeddings.requires_grad_(True)
    embeddings.cls_token.requires_grad_(True)
    return ["base_model.model.vit.embeddings.cls_token", "base_model.model.vit.embeddings.position_embeddings"]
