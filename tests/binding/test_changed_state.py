"""Issue 9: the adapter file carries the difference between the trained model and the base model it was created
from, minus what PEFT saves itself: every kind of state training moves, whatever entry point ran the model.

Each scenario is shown to reload bitwise with peft_buffers and to differ with stock PEFT.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_buffers
from peft_buffers import PeftBuffersWarning
from tests.zoo import _seeded

from .._warnings import first_seen

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class SpectralNet(nn.Module):
    """Spectral norm both ways: the parametrization (``_u``/``_v``) and the old hook (``weight_u``/``weight_v``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 6, 3, padding=1))
        self.old = nn.utils.spectral_norm(nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.old(self.conv(x).mean(dim=(2, 3)))))


class RouterMoE(nn.Module):
    """Aux-loss-free load balancing: a persistent router bias updated without gradient in train mode."""

    def __init__(self, experts=4, dim=6):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))
        self.register_buffer("router_bias", torch.zeros(experts))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        scores = self.gate(x) + self.router_bias
        top = scores.argmax(dim=-1)
        if self.training:
            with torch.no_grad():
                load = torch.bincount(top, minlength=len(self.experts)).float()
                self.router_bias += 0.1 * torch.sign(load.mean() - load)
        out = torch.stack([expert(x) for expert in self.experts], dim=1)
        return self.head(out[torch.arange(len(x)), top])


class Features(nn.Module):
    """A timm-like model: ``forward_features`` then ``forward_head``; training often calls the first alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pos_embed = nn.Parameter(torch.zeros(1, 6, 1, 1))
        self.head = nn.Linear(6, 3)

    def forward_features(self, x):
        return torch.relu(self.bn(self.stem(x) + self.pos_embed))

    def forward(self, x):
        return self.head(self.forward_features(x).mean(dim=(2, 3)))


MODELS = {
    "spectral": (_seeded(SpectralNet), lambda: torch.randn(4, 3, 5, 5), ["head"]),
    "router": (_seeded(RouterMoE), lambda: torch.randn(16, 6), ["head"]),
    "features": (_seeded(Features), lambda: torch.randn(4, 3, 5, 5), ["stem"]),
}


def inputs(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][1]()


def lora(name, adapter="default", model=None):
    make, _, targets = MODELS[name]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    if model is None:
        return get_peft_model(make(), config, adapter_name=adapter)
    model.add_adapter(adapter, config)
    return model


def train(model, name, steps=2, entry=None, seed=1):
    """Two SGD steps in train mode; ``entry`` is the callable the loss is computed from (default: the model)."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        out = (entry or model)(inputs(name, seed + step) * 2 + 0.5)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def reload(name, path, **kwargs):
    return PeftModel.from_pretrained(MODELS[name][0](), path, **kwargs).eval()


def same_output(a, b, name):
    x = inputs(name, seed=99)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def saved(path):
    return load_file(str(path / ADAPTER_FILE))


def assert_file_is_stocks(model, tmp_path):
    """Saved with peft_buffers and then without it: the two adapter files must be the same bytes."""
    model.save_pretrained(tmp_path / "ours", safe_serialization=True)
    peft_buffers.disable()
    model.save_pretrained(tmp_path / "stock", safe_serialization=True)
    assert (tmp_path / "ours" / ADAPTER_FILE).read_bytes() == (tmp_path / "stock" / ADAPTER_FILE).read_bytes()


@pytest.mark.parametrize("name, expected", [
    ("spectral", {"conv.parametrizations.weight.0._u", "conv.parametrizations.weight.0._v", "old.weight_u"}),
    ("router", {"router_bias"}),
])
def test_buffers_training_moves_travel(enabled, tmp_path, name, expected):
    model = lora(name)
    train(model, name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    keys = set(saved(tmp_path)) - {k for k in saved(tmp_path) if "lora_" in k}
    assert {PREFIX + k for k in expected} <= keys
    assert same_output(reload(name, tmp_path), model, name)


@pytest.mark.parametrize("name", ["spectral", "router"])
def test_without_peft_buffers_those_buffers_are_lost(stock, tmp_path, name):
    model = lora(name)
    train(model, name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert not same_output(reload(name, tmp_path), model, name)


def test_a_refrozen_direct_parameter_still_travels(enabled, tmp_path):
    model = lora("features")
    pos_embed = model.get_base_model().pos_embed
    pos_embed.requires_grad_(True)
    train(model, "features")
    pos_embed.requires_grad_(False)  # frozen again before export: today's users do this
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert PREFIX + "pos_embed" in saved(tmp_path)
    assert same_output(reload("features", tmp_path), model, "features")


def test_without_peft_buffers_a_refrozen_parameter_is_lost(stock, tmp_path):
    model = lora("features")
    model.get_base_model().pos_embed.requires_grad_(True)
    train(model, "features")
    model.get_base_model().pos_embed.requires_grad_(False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert not same_output(reload("features", tmp_path), model, "features")


def test_training_through_forward_features_keeps_base_values(enabled, tmp_path):
    """Two adapters trained one after the other through ``forward_features``: each file holds its own state,
    ``disable_adapter()`` computes with the base model's."""
    model = lora("features", "first")
    lora("features", "second", model)
    base_model = model.get_base_model()
    for adapter, seed in (("first", 1), ("second", 7)):
        model.set_adapter(adapter)
        train(model, "features", entry=base_model.forward_features, seed=seed)
    model.save_pretrained(tmp_path, safe_serialization=True)  # PEFT writes a non-default adapter to tmp_path / <name>
    files = {adapter: saved(tmp_path / adapter) for adapter in ("first", "second")}
    key = PREFIX + "bn.running_mean"
    assert not torch.equal(files["first"][key], files["second"][key])
    fresh = MODELS["features"][0]().eval()
    with model.disable_adapter():
        assert same_output(model, fresh, "features")
    for adapter in ("first", "second"):
        model.set_adapter(adapter)
        assert same_output(reload("features", tmp_path / adapter, adapter_name=adapter), model, "features")


def test_frozen_batchnorm_in_eval_mode_saves_no_statistics(enabled, tmp_path):
    # Rule 4: tensors that did not change are never saved: the file is stock PEFT's, byte for byte.
    model = lora("features")
    model.train()
    model.get_base_model().bn.eval()  # BatchNorm frozen in eval mode during training
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(inputs("features")).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert_file_is_stocks(model, tmp_path)


def test_a_cast_after_wrapping_is_not_a_change(enabled, tmp_path):
    model = lora("features")
    model.double()  # cast after wrapping: every base tensor's bytes differ, none was trained
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert {k for k in saved(tmp_path) if "lora_" not in k} == set()


def test_merged_weights_are_not_saved(enabled, tmp_path):
    model = lora("features")
    train(model, "features")
    model.merge_adapter()  # PEFT itself changes the base weight
    model.save_pretrained(tmp_path, safe_serialization=True)
    extra = {k for k in saved(tmp_path) if "lora_" not in k}
    assert extra == {PREFIX + f"bn.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_training_while_no_adapter_is_active_warns_naming_the_tensors(enabled, tmp_path):
    # Rule 6: a change no adapter can own is said at save time, never lost silently.
    model = lora("features")
    with model.disable_adapter():
        model.train()
        model(inputs("features"))
        model.eval()
    with pytest.warns(PeftBuffersWarning, match="^" + re.escape(
            "peft_buffers: 3 base-model tensors changed while no adapter was active (e.g. training inside "
            "disable_adapter()): no adapter file carries them, and the base model computes with the changed values "
            "now: base_model.model.bn.num_batches_tracked, base_model.model.bn.running_mean, "
            "base_model.model.bn.running_var") + "$"):
        model.save_pretrained(tmp_path, safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every save
        model.save_pretrained(tmp_path / "again", safe_serialization=True)


def test_a_parameter_changed_outside_an_optimizer_is_saved_and_said(enabled, tmp_path):
    model = lora("features")
    model.get_base_model().pos_embed.requires_grad_(True)
    with torch.no_grad():
        model.get_base_model().pos_embed.add_(1.0)  # an in-place edit of a trainable parameter no optimizer saw
    with pytest.warns(PeftBuffersWarning, match="^" + re.escape(
            "peft_buffers: adapter 'default' carries 1 parameter changed in place outside an optimizer before "
            "peft_buffers knew the base value; disable_adapter() and other adapters compute with the value first "
            "seen: base_model.model.pos_embed") + "$"):
        model.save_pretrained(tmp_path, safe_serialization=True)
    assert PREFIX + "pos_embed" in saved(tmp_path)
    assert same_output(reload("features", tmp_path), model.eval(), "features")


def test_a_frozen_parameter_re_bound_in_place_is_not_taken_for_training(enabled, tmp_path):
    # PEFT 0.22's target_parameters layers register a parametrization at every forward, which calls
    # `original.set_(...)` on the frozen base parameter: its version counter moves, its value does not.
    model = lora("features")
    weight = model.get_base_model().pos_embed
    with torch.no_grad():
        weight.set_(weight.detach().clone())
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert {k for k in saved(tmp_path) if "lora_" not in k} == set()


def test_enable_after_creation_falls_back_to_all_statistics_and_says_so(tmp_path):
    model = lora("features")  # created before enable(): the base values were never seen
    train(model, "features")
    peft_buffers.enable()
    with pytest.warns(PeftBuffersWarning, match=first_seen(3)):
        model.save_pretrained(tmp_path, safe_serialization=True)
    assert same_output(reload("features", tmp_path), model, "features")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _tiny_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                            layer_scale_init_value=1e-2)
    return ConvNextForImageClassification(config)


@pytest.mark.parametrize("make, targets, batch", [
    (_tiny_llama, ["q_proj", "v_proj"], lambda: {"input_ids": torch.randint(0, 64, (2, 8)),
                                                 "labels": torch.randint(0, 64, (2, 8))}),
    (_tiny_convnext, ["pwconv1", "pwconv2"], lambda: {"pixel_values": torch.randn(2, 3, 32, 32),
                                          "labels": torch.tensor([0, 1])}),
], ids=["llama", "convnext"])
def test_llm_and_convnext_files_are_byte_identical_to_stock(enabled, tmp_path, make, targets, batch):
    # Rule 4: nothing but what PEFT saves changed, so the file is stock PEFT's, byte for byte.
    model = get_peft_model(make(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_file_is_stocks(model, tmp_path)


def test_a_direct_parameter_survives_add_adapter_freezing_it(enabled, tmp_path):
    # PEFT 0.6-0.20's add_adapter sets requires_grad=False on every base parameter: the first adapter's trained
    # pos_embed must still be its own (found by the cross-version matrix, issue 12).
    model = lora("features")
    model.get_base_model().pos_embed.requires_grad_(True)
    train(model, "features")
    expected = model(inputs("features", 99)).detach()
    lora("features", "second", model)
    model.set_adapter("second")
    train(model, "features", seed=5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert PREFIX + "pos_embed" in saved(tmp_path)
    assert torch.equal(reload("features", tmp_path)(inputs("features", 99)), expected)


def test_disable_adapter_shows_the_base_value_of_a_trained_direct_parameter(enabled):
    model = lora("features")
    model.get_base_model().pos_embed.requires_grad_(True)
    train(model, "features")
    with model.disable_adapter():
        assert torch.equal(model.get_base_model().pos_embed, torch.zeros(1, 6, 1, 1))
        assert same_output(model, MODELS["features"][0]().eval(), "features")
    assert not torch.equal(model.get_base_model().pos_embed, torch.zeros(1, 6, 1, 1))


def test_an_optimizer_given_every_parameter_copies_only_trainable_ones(enabled):
    # PEFT's own tests (and many users) pass model.parameters(): frozen base weights must not be copied, and a
    # later merge_adapter() must not look like training (PEFT's test_disable_adapters_with_merging).
    model = lora("features")
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    store = model.__dict__["_peft_buffers_store"]
    assert not any(key.endswith(("stem.base_layer.weight", "stem.weight", "head.weight")) for key in store.reference)
