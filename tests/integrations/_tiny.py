"""Small random-init models and a few deterministic training steps, shared by the integration tests."""

from __future__ import annotations

import torch
from torch import nn

IMAGE = (3, 16, 16)
NUM_LABELS = 3
# The first BatchNorm of the ResNet stem: its affine weight is the direct parameter the tests unfreeze.
STEM_NORM = "resnet.embedder.embedder.normalization"


def resnet_config():
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                        num_labels=NUM_LABELS)


def resnet(seed: int = 0) -> nn.Module:
    """A tiny random-init transformers ResNet; the same ``seed`` gives the same weights."""
    from transformers import ResNetForImageClassification

    torch.manual_seed(seed)
    return ResNetForImageClassification(resnet_config())


def lora_config(**overrides):
    from peft import LoraConfig

    return LoraConfig(**{"target_modules": ["convolution"], "r": 2, "init_lora_weights": False, **overrides})


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, seed: int, steps: int = 3) -> None:
    """A few SGD steps in train mode: adapter weights, direct parameters and running statistics all move."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    for step in range(steps):
        out = model(images(4, seed * 100 + step))
        out = out.logits if hasattr(out, "logits") else out
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(images(2, 999) if x is None else x)
    return out.logits if hasattr(out, "logits") else out
