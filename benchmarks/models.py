"""The benchmarked models: random-init transformers models built from configs, with their LoRA setup.

Each :class:`ModelSpec` says how to build the base model (full size, or a tiny ``quick`` variant for the CPU
smoke run), which modules LoRA targets, which modules the ``modules_to_save`` workaround copies, which base
parameters the user unfreezes (ViT's position embeddings and cls token), and how to make a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "ModelSpec", "NormStack", "norm_module_names"]


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model. ``build(quick)`` returns the base model on the CPU, in float32."""

    name: str
    label: str
    build: Callable[[bool], nn.Module]
    lora_targets: Callable[[nn.Module], list]
    workaround_modules: Callable[[nn.Module], list]
    workaround_note: str
    kind: str  # "image" or "causal_lm"
    image_size: tuple = (224, 32)  # (full, quick)
    batch: tuple = (32, 4)  # training batch (full, quick)
    seq_len: tuple = (512, 32)  # causal LM only
    dtype: torch.dtype = torch.float32
    lora_r: int = 16
    direct_params: tuple = ()  # base parameters the user trains besides the adapter
    notes: str = ""
    vocab: dict = field(default_factory=dict)

    def make_batch(self, quick: bool, generator: torch.Generator, train: bool = True) -> dict:
        """Inputs (and labels) for one step, drawn on the CPU from ``generator``."""
        batch = self.batch[quick] if train else 4
        if self.kind == "image":
            size = self.image_size[quick]
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            labels = torch.randint(0, 10, (batch,), generator=generator)
            return {"pixel_values": pixels, "labels": labels}
        seq = self.seq_len[quick] if train else min(128, self.seq_len[quick])
        vocab = self.vocab["quick" if quick else "full"]
        ids = torch.randint(0, vocab, (batch if train else 2, seq), generator=generator)
        return {"input_ids": ids, "labels": ids}


def loss_of(spec: ModelSpec, model: nn.Module, batch: dict) -> torch.Tensor:
    if spec.kind == "image":
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def logits_of(spec: ModelSpec, model: nn.Module, batch: dict) -> torch.Tensor:
    key = "pixel_values" if spec.kind == "image" else "input_ids"
    return model(**{key: batch[key]}).logits


# ------------------------------------------------------------------------------------------ module choice


def norm_module_names(model: nn.Module) -> list:
    """Names of every normalisation layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm and look-alikes)."""
    names = []
    for name, module in model.named_modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
        if is_norm or type(module).__name__.endswith(("Norm", "RMSNorm")):
            names.append(name)
    return names


def _dense_convs(model: nn.Module) -> list:
    # LoRA on a grouped (depthwise) conv needs r divisible by groups: target the groups=1 convolutions.
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _linear_named(*leaves: str) -> Callable[[nn.Module], list]:
    def select(model: nn.Module) -> list:
        return [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves
        ]

    return select


def _convs_named(*leaves: str) -> Callable[[nn.Module], list]:
    def select(model: nn.Module) -> list:
        return [
            n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.rsplit(".", 1)[-1] in leaves
        ]

    return select


def _embeddings_module(model: nn.Module) -> list:
    """The module that holds ViT's position embeddings (the workaround saves it whole)."""
    return [n for n, m in model.named_modules() if "position_embeddings" in m._parameters]


# ----------------------------------------------------------------------------------------------- builders


def _resnet50(quick: bool) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    if quick:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    else:
        config = ResNetConfig(num_labels=1000)  # defaults: ResNet-50 (bottleneck, depths 3-4-6-3)
    return ResNetForImageClassification(config)


def _mobilenet_v2(quick: bool) -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    # tf_padding=False: the TF-style padding reads conv.stride, which PEFT's LoRA conv layer does not expose.
    if quick:
        config = MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=10, tf_padding=False)
    else:
        config = MobileNetV2Config(num_labels=1000, tf_padding=False)  # defaults: width 1.0, 224 px
    return MobileNetV2ForImageClassification(config)


def _convnext_tiny(quick: bool) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    if quick:
        config = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10)
    else:
        config = ConvNextConfig(num_labels=1000)  # defaults: ConvNeXt-Tiny (96-768, depths 3-3-9-3)
    return ConvNextForImageClassification(config)


def _vit_b16_384(quick: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    if quick:
        config = ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=10,
        )
    else:
        config = ViTConfig(image_size=384, patch_size=16, num_labels=1000)  # defaults: ViT-B (768, 12 layers)
    return ViTForImageClassification(config)


class _SNBlock(nn.Module):
    """A residual block of an SN-GAN discriminator: a spectrally normalised 3×3 conv, then a 1×1 projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(channels, channels, 3, padding=1))
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.leaky_relu(self.conv(x), 0.2))


class SpectralNormNet(nn.Module):
    """An SN-GAN-style discriminator used as a classifier: its changed state is spectral norm, not statistics.

    Every train-mode forward runs one power iteration and writes the singular-vector estimates (``_u``/``_v``
    of ``torch.nn.utils.parametrizations.spectral_norm``, ``weight_u``/``weight_v`` of the old
    ``torch.nn.utils.spectral_norm`` on the head): persistent buffers that are neither running statistics nor
    trainable, and that set the effective weights in eval mode.
    """

    def __init__(self, channels: int, blocks: int, num_labels: int = 10):
        super().__init__()
        self.stem = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, channels, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*(_SNBlock(channels) for _ in range(blocks)))
        self.head = nn.utils.spectral_norm(nn.Linear(channels, num_labels))

    def forward(self, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import ImageClassifierOutput

        x = self.blocks(F.leaky_relu(self.stem(pixel_values), 0.2))
        return ImageClassifierOutput(logits=self.head(x.mean(dim=(2, 3))))


def _spectral_norm_net(quick: bool) -> nn.Module:
    return SpectralNormNet(channels=8, blocks=2) if quick else SpectralNormNet(channels=256, blocks=8)


def spectral_norm_module_names(model: nn.Module) -> list:
    """Modules carrying spectral norm (either API): the ``modules_to_save`` workaround copies them whole."""
    return [n for n, m in model.named_modules() if hasattr(m, "parametrizations") or hasattr(m, "weight_u")]


LLAMA_VOCAB = {"full": 32000, "quick": 512}


def _llama_1b(quick: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=LLAMA_VOCAB["quick"], max_position_embeddings=128,
        )
    else:  # TinyLlama-1.1B's shape
        config = LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=LLAMA_VOCAB["full"], max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    return LlamaForCausalLM(config)


MODELS: tuple = (
    ModelSpec(
        name="resnet50", label="ResNet-50", build=_resnet50, kind="image",
        lora_targets=_dense_convs, workaround_modules=norm_module_names,
        workaround_note="all BatchNorm layers",
        notes="LoRA r=16 on every convolution; 53 BatchNorm2d layers",
    ),
    ModelSpec(
        name="mobilenet_v2", label="MobileNetV2", build=_mobilenet_v2, kind="image",
        lora_targets=_dense_convs, workaround_modules=norm_module_names,
        workaround_note="all BatchNorm layers",
        notes="LoRA r=16 on the groups=1 convolutions (not the depthwise ones); tf_padding=False",
    ),
    ModelSpec(
        name="convnext_tiny", label="ConvNeXt-Tiny", build=_convnext_tiny, kind="image",
        lora_targets=_linear_named("pwconv1", "pwconv2"), workaround_modules=norm_module_names,
        workaround_note="all LayerNorm layers",
        notes="LoRA r=16 on pwconv1/pwconv2; LayerNorm only: no running statistics",
    ),
    ModelSpec(
        name="vit_b16_384", label="ViT-B/16 @384", build=_vit_b16_384, kind="image", image_size=(384, 32),
        batch=(16, 4), lora_targets=_linear_named("q_proj", "v_proj", "query", "value"),
        workaround_modules=_embeddings_module, workaround_note="the embeddings module (patch conv included)",
        direct_params=("position_embeddings", "cls_token"),
        notes="LoRA r=16 on query/value; position embeddings and cls token trained",
    ),
    ModelSpec(
        name="llama_1b", label="Llama 1.1B (bf16)", build=_llama_1b, kind="causal_lm", batch=(4, 2),
        lora_targets=_linear_named("q_proj", "k_proj", "v_proj", "o_proj"), workaround_modules=norm_module_names,
        workaround_note="all RMSNorm layers", dtype=torch.bfloat16, vocab=LLAMA_VOCAB,
        notes="TinyLlama-1.1B shape, bf16 base; LoRA r=16 on q/k/v/o; no extra state",
    ),
    ModelSpec(
        name="spectral_norm", label="SN discriminator", build=_spectral_norm_net, kind="image", image_size=(64, 32),
        lora_targets=_convs_named("proj"), workaround_modules=spectral_norm_module_names,
        workaround_note="every spectrally normalised module",
        notes="SN-GAN-style: 9 spectral-norm convs (parametrizations API) + a spectral-norm head (old API); "
              "LoRA r=16 on the 1×1 projections; changed state: power-iteration vectors, no running statistics",
    ),
)


# ---------------------------------------------------------------------------------------- scaling model


class _NormBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)


class NormStack(nn.Module):
    """A LoRA-targetable projection followed by ``n`` BatchNorm1d layers (the scaling sweep's model).

    The adapter itself stays the same size at every ``n``, so the sweep isolates the cost of the extra state.
    """

    def __init__(self, n: int, channels: int = 8):
        super().__init__()
        self.proj = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(_NormBlock(channels) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block.norm(x)
        return x
