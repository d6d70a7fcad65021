"""Issue 10 §3: adapters of different configs in one model keep their own state exactly.

Files name tensors by their base-model names (``base_layer.`` only where the saving model had the wrapper);
loading resolves them whatever wrappers other adapters added or removed since.
"""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from .._compat import PEFT_VERSION
from .._load_failures import Net  # the model of issue 10: fc1 -> bn1 -> mid -> bn2 -> head

PREFIX = "base_model.model."


# Before PEFT 0.16, mixing adapters with and without modules_to_save is broken in PEFT itself: 0.6's add_adapter
# fails, 0.7 raises in set_adapter, and 0.8-0.15 change an adapter's output when set_adapter switches away from it
# and back, with peft_buffers disabled too (checked on 0.14.0).
requires_mixed_modules_to_save = pytest.mark.skipif(
    PEFT_VERSION < Version("0.16.0"),
    reason=f"PEFT {PEFT_VERSION} cannot mix adapters with and without modules_to_save (fixed in PEFT 0.16)")


def make():
    torch.manual_seed(0)
    return Net()


# Adapter names that are no substring of PEFT's key names ("A" is in "lora_A": PEFT < 0.14 then mixes keys up).
CONFIGS = {
    # one trains `mid.weight` as a direct parameter; two wraps `mid` with LoRA; three saves bn2 itself.
    "one": dict(target_modules=["fc1"]),
    "two": dict(target_modules=["mid"]),
    "three": dict(target_modules=["head"], modules_to_save=["bn2"]),
}
DIRECT = {"one": ["mid.weight"], "two": [], "three": []}


def config(name):
    return LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **CONFIGS[name])


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=generator) * 2 + 0.5


def train(model, adapter, seed):
    model.set_adapter(adapter)
    for name in DIRECT[adapter]:  # through a LoRA wrapper too: its `weight` is the base layer's
        module, attr = name.rsplit(".", 1)
        getattr(model.get_base_model().get_submodule(module), attr).requires_grad_(True)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        model(batch(seed + step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def out(model):
    with torch.no_grad():
        return model(batch(99))


def build(order):
    """Adapters added and trained one after the other in ``order``; returns the model."""
    model = None
    for i, name in enumerate(order):
        if model is None:
            model = get_peft_model(make(), config(name), adapter_name=name)
        else:
            model.add_adapter(name, config(name))
        train(model, name, seed=10 * i)
    return model


@requires_mixed_modules_to_save
@pytest.mark.parametrize("order", [("one", "two", "three"), ("three", "two", "one"), ("two", "one", "three")],
                         ids="-".join)
def test_each_adapter_keeps_its_own_state_in_any_mix(enabled, tmp_path, order):
    model = build(order)
    expected = {}
    for name in order:
        model.set_adapter(name)
        expected[name] = out(model)
    with model.disable_adapter():
        assert torch.equal(out(model), out(make().eval()))
    model.save_pretrained(tmp_path, selected_adapters=list(order), safe_serialization=True)
    for name in order:
        path = tmp_path / name
        single = PeftModel.from_pretrained(make(), path, adapter_name=name).eval()
        assert torch.equal(out(single), expected[name]), name
    # and all three loaded into one model, in the reverse order, switch exactly
    loaded = PeftModel.from_pretrained(make(), tmp_path / order[-1], adapter_name=order[-1])
    for name in reversed(order[:-1]):
        loaded.load_adapter(tmp_path / name, adapter_name=name)
    loaded.eval()
    for name in order:
        loaded.set_adapter(name)
        assert torch.equal(out(loaded), expected[name]), name


def test_direct_parameter_inside_another_adapters_wrapper_keeps_its_name(enabled, tmp_path):
    model = build(("one", "two"))  # B wrapped `mid` after A trained `mid.weight`
    model.save_pretrained(tmp_path, selected_adapters=["one"], safe_serialization=True)
    keys = set(load_file(str(tmp_path / "one" / "adapter_model.safetensors")))
    live = next(k for k in model.state_dict() if k.startswith(PREFIX + "mid.") and k.endswith(".weight")
                and "lora_" not in k)  # mid.base_layer.weight; PEFT 0.6's LoRA layer *is* the Linear: mid.weight
    assert live in keys  # named as in the saving model
    assert {k for k in keys if k.startswith(PREFIX + "mid.") and "lora_" not in k} == {live}


@requires_mixed_modules_to_save
def test_modules_to_save_of_one_adapter_leaves_the_others_statistics_theirs(enabled, tmp_path):
    model = build(("one", "two"))
    model.set_adapter("one")
    a_bn2 = model.get_base_model().bn2.running_mean.clone()
    model.add_adapter("three", config("three"))  # wraps bn2 in a ModulesToSaveWrapper
    train(model, "three", seed=50)
    model.set_adapter("one")
    assert torch.equal(model.get_base_model().bn2.original_module.running_mean, a_bn2)
    model.save_pretrained(tmp_path, selected_adapters=["one", "two"], safe_serialization=True)
    for name in ("one", "two"):
        keys = set(load_file(str(tmp_path / name / "adapter_model.safetensors")))
        assert PREFIX + "bn2.running_mean" in keys, name  # the base name: stock PEFT loads it


@requires_mixed_modules_to_save
def test_without_peft_buffers_mixed_adapters_lose_state(stock, tmp_path):
    model = build(("one", "two", "three"))
    model.set_adapter("one")
    expected = out(model)
    model.save_pretrained(tmp_path, selected_adapters=["one"], safe_serialization=True)
    single = PeftModel.from_pretrained(make(), tmp_path / "one", adapter_name="one").eval()
    assert not torch.equal(out(single), expected)
