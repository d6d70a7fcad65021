"""``python -m peft_buffers demo``: the problem and the fix, in one table, on CPU in seconds.

Trains a small random-init ResNet (transformers' ``ResNetForImageClassification`` when transformers is
installed, a plain-torch ResNet otherwise) with LoRA for a few steps, saves the adapter with stock PEFT
and with peft_buffers, reloads each onto a fresh base model, and compares logits with the trained model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional, TextIO

import torch
from torch import nn

__all__ = ["HELP", "add_arguments", "run", "run_demo"]

HELP = "show the problem and the fix on a small ResNet, on CPU"


class _Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.convolution = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.normalization = nn.BatchNorm2d(channels_out)

    def forward(self, x):
        return torch.relu(self.normalization(self.convolution(x)))


class _TorchResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(_Block(3, 16, 1), _Block(16, 32, 2), _Block(32, 64, 2))
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.stages(x).mean(dim=(2, 3)))


def _make_base() -> nn.Module:
    torch.manual_seed(0)
    try:
        from transformers import ResNetConfig, ResNetForImageClassification
    except ImportError:
        return _TorchResNet()
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
                          num_labels=10)
    return ResNetForImageClassification(config)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)


def run_demo(workdir: Path, steps: int = 5) -> list[dict]:
    """Train, save and reload with and without peft_buffers; one result row per strategy.

    Example:
        >>> rows = run_demo(Path(tempfile.mkdtemp()), steps=1)  # doctest: +SKIP
        >>> [row["max_abs_diff"] == 0.0 for row in rows]  # doctest: +SKIP
        [False, True]
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    import peft_buffers

    from ._inspect import inspect_adapter

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations: not our message
    was_enabled = peft_buffers.is_enabled()
    peft_buffers.enable()  # before get_peft_model, so disable_adapter() would see the pre-training base
    model = get_peft_model(_make_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["convolution"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):  # train mode: BatchNorm running statistics move away from the base model's
        x = torch.randn(8, 3, 32, 32, generator=generator) * 2 + 0.5
        _logits(model, x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        trained = _logits(model, x)

    rows = []
    for label, enable in (("stock PEFT", False), ("peft_buffers", True)):
        (peft_buffers.enable if enable else peft_buffers.disable)()
        out_dir = workdir / label.replace(" ", "_")
        model.save_pretrained(out_dir)
        loaded = PeftModel.from_pretrained(_make_base(), out_dir).eval()
        with torch.no_grad():
            diff = (_logits(loaded, x) - trained).abs().max().item()
        summary = inspect_adapter(out_dir)
        stats = sum(len(v) for v in summary.running_stats.values())
        rows.append({
            "strategy": label,
            "max_abs_diff": diff,
            "file_bytes": summary.file_bytes,
            "extra": f"{stats} running-stat tensors in {len(summary.running_stats)} norm layers"
            if stats else "nothing",
        })
    (peft_buffers.enable if was_enabled else peft_buffers.disable)()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo takes no options (``--help`` only).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> parser.parse_args([])
        Namespace()
    """


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Run the demo and print the table; exit status 1 if peft_buffers did not give bitwise-equal logits.

    Example (about 10 s, so not run as a doctest; its output is in docs/cli.md)::

        $ python -m peft_buffers demo
    """
    out = out or sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_demo(Path(tmp))
    print("Train a random-init ResNet with LoRA (5 steps, CPU), save the adapter, reload onto a fresh base:\n",
          file=out)
    print(f"{'saved with':<14} {'max |Δ logits| after reload':>28} {'adapter file bytes':>19}  extra state in "
          f"the file", file=out)
    for row in rows:
        print(f"{row['strategy']:<14} {row['max_abs_diff']:>28.3e} {row['file_bytes']:>19,}  {row['extra']}",
              file=out)
    ok = rows[1]["max_abs_diff"] == 0.0 and rows[0]["max_abs_diff"] > 0.0
    verdict = ("peft_buffers reload is bitwise identical; stock PEFT lost the BatchNorm statistics."
               if ok else "UNEXPECTED: see the table above.")
    print(f"\n{verdict}", file=out)
    return 0 if ok else 1
