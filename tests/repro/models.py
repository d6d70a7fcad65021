"""Tiny models for the reproducibility-toolkit tests (random init, seeded: make_* gives the same weights each time)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class NormNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear: running statistics move in train mode."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc1(x))))


class TwoLinear(nn.Module):
    """The two-Linear network of the lora_dropout report (PEFT #2438): no state besides weights."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


def seeded(cls: type) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return cls()

    return make


make_norm_net = seeded(NormNet)
make_two_linear = seeded(TwoLinear)


def inputs(seed: int = 5, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def lora(make_base: Callable[[], nn.Module], **config) -> nn.Module:
    config.setdefault("target_modules", ["fc1"])
    return get_peft_model(make_base(), LoraConfig(**config))


def train(model: nn.Module, steps: int = 3, lr: float = 0.1, seed: int = 1,
          optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """A few SGD steps on random data, in train mode."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        x = torch.randn(8, 8, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    settings.update(overrides)
    return LlamaConfig(**settings)


def make_tiny_llama(dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)


def token_inputs() -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))}


def train_llama(model: nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    model.train()
    ids = token_inputs()["input_ids"].to(next(model.parameters()).device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
