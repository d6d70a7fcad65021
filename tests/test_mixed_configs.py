"""Issue 10 §3: adapters of different configs in one model keep their own state exactly.

Files name tensors by their base-model names (``base_layer.`` only where the saving model had the wrapper);
loading resolves them whatever wrappers other adapters added or removed since.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

PREFIX = "base_model.model."


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.mid = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.mid(torch.relu(self.bn1(self.fc1(x)))))))


def make():
    torch.manual_seed(0)
    return Net()


CONFIGS = {
    # A trains `mid.weight` as a direct parameter; B wraps `mid` with LoRA; C saves bn2 itself.
    "A": dict(target_modules=["fc1"]),
    "B": dict(target_modules=["mid"]),
    "C": dict(target_modules=["head"], modules_to_save=["bn2"]),
}
DIRECT = {"A": ["mid.weight"], "B": [], "C": []}


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


@pytest.mark.parametrize("order", [("A", "B", "C"), ("C", "B", "A"), ("B", "A", "C")], ids="".join)
def test_each_adapter_keeps_its_own_state_in_any_mix(enabled, tmp_path, order):
    model = build(order)
    expected = {}
    for name in order:
        model.set_adapter(name)
        expected[name] = out(model)
    with model.disable_adapter():
        assert torch.equal(out(model), out(make().eval()))
    model.save_pretrained(tmp_path, selected_adapters=list(order))
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
    model = build(("A", "B"))  # B wrapped `mid` after A trained `mid.weight`
    model.save_pretrained(tmp_path, selected_adapters=["A"])
    keys = set(load_file(str(tmp_path / "A" / "adapter_model.safetensors")))
    assert PREFIX + "mid.base_layer.weight" in keys  # the saving model had the wrapper
    assert PREFIX + "mid.weight" not in keys


def test_modules_to_save_of_one_adapter_leaves_the_others_statistics_theirs(enabled, tmp_path):
    model = build(("A", "B"))
    model.set_adapter("A")
    a_bn2 = model.get_base_model().bn2.running_mean.clone()
    model.add_adapter("C", config("C"))  # wraps bn2 in a ModulesToSaveWrapper
    train(model, "C", seed=50)
    model.set_adapter("A")
    assert torch.equal(model.get_base_model().bn2.original_module.running_mean, a_bn2)
    model.save_pretrained(tmp_path, selected_adapters=["A", "B"])
    for name in ("A", "B"):
        keys = set(load_file(str(tmp_path / name / "adapter_model.safetensors")))
        assert PREFIX + "bn2.running_mean" in keys, name  # the base name: stock PEFT loads it


def test_without_peft_buffers_mixed_adapters_lose_state(stock, tmp_path):
    model = build(("A", "B", "C"))
    model.set_adapter("A")
    expected = out(model)
    model.save_pretrained(tmp_path, selected_adapters=["A"])
    single = PeftModel.from_pretrained(make(), tmp_path / "A", adapter_name="A").eval()
    assert not torch.equal(out(single), expected)
