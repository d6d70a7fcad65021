"""The table of real vision models the ``vision`` nox session trains, saves and reloads (issue 9).

One row per model, timm-registry style: a name, how to build it (random init: ``weights=None``,
``pretrained=False``), where LoRA goes, which extra state training changes in the base model, the input size
and how it is trained. ``tests/vision/test_models.py`` runs every row; ``docs/model-zoo.md`` is rendered from
this table (``python -m tests.vision.models`` rewrites it; a test checks it is current).

torchvision and timm are imported only when a model is built, so this module (and the doc test) imports
without them.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from tests.zoo import logits

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "model-zoo.md"
EVAL_SEED = 99  # the batch every comparison of outputs uses


@dataclass(frozen=True)
class StateKind:
    """A kind of base-model state that training changes, and the state-dict keys that hold it."""

    label: str
    key_pattern: str  # regex searched in the base model's own state-dict names

    def matches(self, key: str) -> bool:
        return re.search(self.key_pattern, key) is not None


RUNNING_STATS = StateKind("running statistics", r"\.(running_mean|running_var|num_batches_tracked)$")
SPECTRAL_UV = StateKind("spectral-norm `_u`/`_v` buffers", r"parametrizations\.weight\.0\._[uv]$")
SPECTRAL_UV_LEGACY = StateKind("spectral-norm `weight_u`/`weight_v` buffers (legacy hook)", r"\.weight_[uv]$")
ROUTER_BIAS = StateKind("router bias updated without gradient", r"\.expert_bias$")
FAKE_QUANT = StateKind("fake-quant `scale`/`zero_point`", r"(fake_quant|activation_post_process)\.(scale|zero_point)$")
OBSERVER_RANGE = StateKind("observer `min_val`/`max_val`", r"activation_post_process\.(min_val|max_val)$")


def trained_parameters(*patterns: str) -> StateKind:
    """The kind for unfrozen base parameters (fnmatch ``patterns`` over the base model's parameter names).

    Example:
        >>> kind = trained_parameters("stages.*.gamma")
        >>> kind.matches("stages.0.blocks.1.gamma"), kind.matches("stages.0.blocks.1.norm.weight")
        (True, False)
    """
    regex = "|".join(fnmatch.translate(pattern).replace(r"\Z", "$") for pattern in patterns)
    names = ", ".join(f"`{pattern}`" for pattern in patterns)
    return StateKind(f"trained parameters {names}", rf"^(?:{regex})")


@dataclass(frozen=True)
class Training:
    """How a row is trained: two SGD steps in train mode through ``entry``, on ``unfrozen`` base parameters too.

    ``refreeze``: the unfrozen parameters get ``requires_grad_(False)`` again before saving.
    """

    entry: str = "forward"  # or "forward_features" (timm): the base model's forward never runs
    unfrozen: tuple[str, ...] = ()  # fnmatch patterns over the base model's parameter names
    refreeze: bool = False
    steps: int = 2
    lr: float = 0.05

    def describe(self) -> str:
        parts = [f"{self.steps} SGD steps through `{self.entry}`"]
        if self.unfrozen:
            parts.append("unfrozen " + ", ".join(f"`{name}`" for name in self.unfrozen))
        if self.refreeze:
            parts.append("frozen again before saving")
        return "; ".join(parts)


@dataclass(frozen=True)
class VisionModel:
    """One row of the table."""

    name: str
    library: str  # "torchvision", "timm" or "torch" (a small module defined here)
    constructor: str  # the call, as a user writes it (rendered in the doc)
    make: Callable[[], nn.Module]  # builds the constructor's model, unseeded; use build()
    targets: tuple[str, ...]  # LoRA target modules (full module names)
    state: tuple[StateKind, ...]  # the extra state training changes in the base model
    image_size: int
    training: Training = field(default_factory=Training)
    batch: int = 2
    note: str = ""  # what a reader of the doc should know about this row

    def build(self) -> nn.Module:
        """The same random-init base model every call (seed 0)."""
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's and timm's deprecation notices
            return self.make()

    def inputs(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, 3, self.image_size, self.image_size, generator=generator)

    def lora_config(self):
        import peft

        return peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(self.targets))


# --- constructors (torchvision and timm are imported here, on first build) ---

NUM_CLASSES = 10


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)

    return make


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return make


def _small_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=NUM_CLASSES)


def _qat_resnet18() -> nn.Module:
    from torchvision.models.quantization import resnet18

    model = resnet18(weights=None, quantize=False, num_classes=NUM_CLASSES).train()
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    return torch.ao.quantization.prepare_qat(model)


class SpectralNormNet(nn.Module):
    """A small conv net whose first conv is spectral-normalised: power iteration moves u/v in train mode."""

    def __init__(self, legacy: bool = False):
        super().__init__()
        conv = nn.Conv2d(3, 8, 3, padding=1)
        if legacy:
            self.conv1 = nn.utils.spectral_norm(conv)  # buffers weight_u, weight_v
        else:
            self.conv1 = nn.utils.parametrizations.spectral_norm(conv)  # parametrizations.weight.0._u, ._v
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


class BiasBalancedMoE(nn.Module):
    """Top-1 mixture of experts with auxiliary-loss-free balancing (a bias steers expert selection only).

    In train mode each forward moves the persistent buffer ``expert_bias`` towards an even load, without
    gradient: state an optimizer never sees.
    """

    def __init__(self, dim: int, experts: int, rate: float = 0.1):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))
        self.register_buffer("expert_bias", torch.zeros(experts))
        self.rate = rate

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.router(tokens))
        choice = (scores + self.expert_bias).argmax(dim=-1)
        outputs = torch.stack([expert(tokens) for expert in self.experts], dim=1)
        picked = outputs[torch.arange(tokens.shape[0]), choice]
        if self.training:
            with torch.no_grad():
                load = torch.bincount(choice, minlength=len(self.experts)).float()
                self.expert_bias += self.rate * (load.mean() - load) / load.mean()
        return picked * scores.gather(1, choice[:, None])


class TinyMoENet(nn.Module):
    """Patch embedding, one bias-balanced MoE layer over the patch tokens, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.moe = BiasBalancedMoE(16, experts=4)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, patches, 16)
        mixed = self.moe(tokens.reshape(-1, tokens.shape[-1])).reshape(tokens.shape)
        return self.head(mixed.mean(dim=1))


# --- the table ---

_VIT_TOKENS = ("pos_embed", "cls_token", "reg_token")

MODELS: tuple[VisionModel, ...] = (
    VisionModel("torchvision/resnet18", "torchvision", "torchvision.models.resnet18(weights=None)",
                _torchvision("resnet18"), ("layer4.1.conv2", "fc"), (RUNNING_STATS,), 32),
    VisionModel("torchvision/mobilenet_v3_small", "torchvision", "torchvision.models.mobilenet_v3_small(weights=None)",
                _torchvision("mobilenet_v3_small"), ("features.12.0", "classifier.3"), (RUNNING_STATS,), 32),
    VisionModel("torchvision/efficientnet_b0", "torchvision", "torchvision.models.efficientnet_b0(weights=None)",
                _torchvision("efficientnet_b0"), ("features.8.0", "classifier.1"), (RUNNING_STATS,), 32),
    VisionModel("torchvision/regnet_y_400mf", "torchvision", "torchvision.models.regnet_y_400mf(weights=None)",
                _torchvision("regnet_y_400mf"), ("trunk_output.block4.block4-5.f.c.0", "fc"), (RUNNING_STATS,), 32),
    VisionModel("torchvision/VisionTransformer", "torchvision",
                "torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, "
                "hidden_dim=32, mlp_dim=64)",
                _small_vit,
                ("encoder.layers.encoder_layer_1.mlp.0", "encoder.layers.encoder_layer_1.mlp.3", "heads.head"),
                (trained_parameters("class_token", "encoder.pos_embedding"),), 32,
                Training(unfrozen=("class_token", "encoder.pos_embedding"))),
    VisionModel("torchvision/quantization.resnet18 (QAT)", "torchvision",
                "torchvision.models.quantization.resnet18(weights=None, quantize=False); fuse_model(is_qat=True); "
                "prepare_qat",
                _qat_resnet18, ("fc",), (RUNNING_STATS, FAKE_QUANT, OBSERVER_RANGE), 32,
                note="per-channel `scale`/`min_val` change shape in the first forward ((1,) to (C,), (0,) to (C,))"),
    VisionModel("timm/resnet18", "timm", 'timm.create_model("resnet18")',
                _timm("resnet18"), ("layer4.1.conv2", "fc"), (RUNNING_STATS,), 32),
    VisionModel("timm/resnet50d", "timm", 'timm.create_model("resnet50d")',
                _timm("resnet50d"), ("layer4.2.conv3", "fc"), (RUNNING_STATS,), 32),
    VisionModel("timm/efficientnet_b0", "timm", 'timm.create_model("efficientnet_b0")',
                _timm("efficientnet_b0"), ("conv_head", "classifier"), (RUNNING_STATS,), 32),
    VisionModel("timm/mobilenetv3_small_050", "timm", 'timm.create_model("mobilenetv3_small_050")',
                _timm("mobilenetv3_small_050"), ("conv_head", "classifier"), (RUNNING_STATS,), 32),
    VisionModel("timm/convnext_atto", "timm", 'timm.create_model("convnext_atto")',
                _timm("convnext_atto"), ("stages.3.blocks.1.mlp.fc1", "head.fc"),
                (trained_parameters("stages.*.blocks.*.gamma"),), 32,
                Training(unfrozen=("stages.*.blocks.*.gamma",))),
    VisionModel("timm/vit_tiny_patch16_224", "timm",
                'timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4)',
                _timm("vit_tiny_patch16_224", img_size=32, reg_tokens=4), ("blocks.11.attn.qkv", "head"),
                (trained_parameters(*_VIT_TOKENS),), 32, Training(unfrozen=_VIT_TOKENS)),
    VisionModel("timm/deit_tiny_distilled_patch16_224", "timm",
                'timm.create_model("deit_tiny_distilled_patch16_224", img_size=32)',
                _timm("deit_tiny_distilled_patch16_224", img_size=32), ("blocks.11.attn.qkv", "head", "head_dist"),
                (trained_parameters("pos_embed", "cls_token", "dist_token"),), 32,
                Training(unfrozen=("pos_embed", "cls_token", "dist_token"))),
    VisionModel("timm/swin_tiny_patch4_window7_224", "timm",
                'timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4)',
                _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4),
                ("layers.3.blocks.1.attn.qkv", "head.fc"),
                (trained_parameters("layers.*.relative_position_bias_table"),), 32,
                Training(unfrozen=("layers.*.relative_position_bias_table",)),
                note="the last stage sees a 1×1 window: its tables get no gradient, stay unchanged and are not saved"),
    VisionModel("timm/resnet18 (forward_features)", "timm", 'timm.create_model("resnet18")',
                _timm("resnet18"), ("layer4.1.conv2", "fc"), (RUNNING_STATS,), 32,
                Training(entry="forward_features"), note="the PeftModel's and the base model's `forward` never run"),
    VisionModel("timm/vit_tiny_patch16_224 (forward_features)", "timm",
                'timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4)',
                _timm("vit_tiny_patch16_224", img_size=32, reg_tokens=4), ("blocks.11.attn.qkv",),
                (trained_parameters("pos_embed"),), 32, Training(entry="forward_features", unfrozen=("pos_embed",))),
    VisionModel("timm/vit_tiny_patch16_224 (re-frozen pos_embed)", "timm",
                'timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4)',
                _timm("vit_tiny_patch16_224", img_size=32, reg_tokens=4), ("blocks.11.attn.qkv", "head"),
                (trained_parameters("pos_embed"),), 32, Training(unfrozen=("pos_embed",), refreeze=True),
                note="`requires_grad=False` at save time, changed all the same"),
    VisionModel("torch/spectral_norm (parametrizations)", "torch",
                "torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3))",
                SpectralNormNet, ("conv2", "head"), (SPECTRAL_UV,), 16),
    VisionModel("torch/spectral_norm (legacy)", "torch", "torch.nn.utils.spectral_norm(nn.Conv2d(3, 8, 3))",
                lambda: SpectralNormNet(legacy=True), ("conv2", "head"), (SPECTRAL_UV_LEGACY,), 16),
    VisionModel("torch/MoE router bias", "torch", "BiasBalancedMoE(16, experts=4) (tests/vision/models.py)",
                TinyMoENet, ("embed", "head"), (ROUTER_BIAS,), 32,
                note="aux-loss-free load balancing: the bias steers expert choice, no gradient reaches it"),
)

BY_NAME = {row.name: row for row in MODELS}


def render_markdown(models: tuple[VisionModel, ...] = MODELS) -> str:
    """The model-zoo page (``docs/model-zoo.md``) for ``models``.

    Example:
        >>> render_markdown(MODELS[:1]).splitlines()[-1].split(" | ")[2:4]
        ['`layer4.1.conv2`, `fc`', 'running statistics']
    """
    lines = [
        "# Model zoo: real vision models, trained and reloaded bitwise",
        "",
        "<!-- generated from tests/vision/models.py by `python -m tests.vision.models` (see CONTRIBUTING.md) -->",
        "",
        "Each model is built with random weights, gets LoRA (r=2) on the listed modules, is trained in train mode,",
        "saved with `save_pretrained` and reloaded with `PeftModel.from_pretrained` on a fresh base model of the",
        "same seed. With `peft_buffers.enable()` the reloaded model's eval-mode outputs are bitwise equal to the",
        "trained model's; with stock PEFT they differ, because the adapter file lacks the extra state listed",
        "here. Every model has `num_classes=10`; timm models are built with `pretrained=False`. Run them with",
        "`nox -s vision` (torch 2.14.1, torchvision 0.29.1, timm; CPU, a few minutes).",
        "",
        "| Model | Built with | LoRA targets | Extra state training changes | Input | Training | Note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in models:
        targets = ", ".join(f"`{target}`" for target in row.targets)
        state = "; ".join(kind.label for kind in row.state)
        size = f"{row.batch}×3×{row.image_size}×{row.image_size}"
        cells = [row.name, f"`{row.constructor}`", targets, state, size, row.training.describe(), row.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def find_row(name: str) -> VisionModel:
    """The row called ``name``; a clear error listing the rows otherwise.

    Example:
        >>> find_row("timm/resnet18").targets
        ('layer4.1.conv2', 'fc')
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no model {name!r} in tests/vision/models.py; rows: {', '.join(BY_NAME)}") from None


def unfreeze(base: nn.Module, patterns: tuple[str, ...]) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the base parameters matching ``patterns`` (fnmatch); each must match one."""
    named = dict(base.named_parameters())
    chosen: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        hits = {name: param for name, param in named.items() if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            raise ValueError(f"unfreeze pattern {pattern!r} matches no parameter of {type(base).__name__}")
        chosen.update(hits)
    for param in chosen.values():
        param.requires_grad_(True)
    return list(chosen.values())


def run_entry(model: nn.Module, entry: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` (a PeftModel) through ``entry``: its own forward, or the base model's forward_features."""
    if entry == "forward":
        return model(x)
    if entry == "forward_features":
        return model.forward_features(x)  # PeftModel forwards the attribute to the timm model
    raise ValueError(f"training entry {entry!r}: expected 'forward' or 'forward_features'")


def train(
    model: nn.Module, row: VisionModel, seed: int = 1, entry: Optional[str] = None, norms_in_eval: bool = False
) -> None:
    """``row.training.steps`` SGD steps in train mode on shifted seeded batches (statistics move visibly).

    ``norms_in_eval``: BatchNorm layers stay in eval mode (frozen statistics), as detection fine-tuning does.
    """
    model.train()
    if norms_in_eval:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=row.training.lr)
    for step in range(row.training.steps):
        x = row.inputs(seed=seed + step) * 2 + 0.5
        # Pulled towards 1, not 0: a zero-initialised head (torchvision's ViT) still gets a gradient.
        (run_entry(model, entry or row.training.entry, x).float() - 1).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs(model, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits without autograd.

    With autograd on, an unfrozen parameter keeps torch's MultiheadAttention off its fast path in the trained
    model only: a 1e-8 difference that is no state of the model.
    """
    with torch.no_grad():
        return logits(model.eval(), x)


def bitwise(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    """Whether the two are bitwise equal, and the largest difference (for the assertion message).

    Example:
        >>> bitwise(torch.zeros(2), torch.tensor([0.0, 1e-8]))
        (False, 'max |Δ| = 1.000e-08')
    """
    if actual.shape != expected.shape:
        return False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return torch.equal(actual, expected), f"max |Δ| = {(actual.double() - expected.double()).abs().max().item():.3e}"


if __name__ == "__main__":
    DOC_PATH.write_text(render_markdown())
    print(f"wrote {DOC_PATH}")
