"""Issue 10 §2: keys that fit nothing and values that are not numbers are refused by name; ``inspect`` shows
every key that writes into a base-model tensor under its real kind."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import peft_buffers
from peft_buffers import IncompatibleExtraState
from peft_buffers.cli._inspect import inspect_adapter
from tests.binding.test_save_load import BN, _assert_untouched, _snapshot, _tamper, trained_model
from tests.zoo import ZOO

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@pytest.mark.parametrize("key, value, expected", [
    (f"{PREFIX}ghost.weight", torch.ones(3), "names no module of the base model; expected a module at "
     "base_model.model.ghost, found no module 'ghost' in base_model.model"),
    (f"{PREFIX}fc1.gamma", torch.ones(16), "names no parameter or buffer of the base model; expected a tensor "
     "'gamma' in base_model.model.fc1"),
    (f"{BN}.running_var", torch.tensor([float("nan")] * 16), "running statistic has non-finite values; expected "
     "finite values, found 1"),
    (f"{BN}.running_mean", torch.full((16,), float("inf")), "running statistic has non-finite values"),
    (f"{BN}.running_var", -torch.ones(16), "running variance is negative; expected values >= 0, found min -1.0"),
], ids=["ghost-module", "ghost-attribute", "nan-var", "inf-mean", "negative-var"])
def test_a_key_that_fits_nothing_or_a_broken_statistic_is_refused(enabled, tmp_path, key, value, expected):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path / "bad", safe_serialization=True)
    _tamper(tmp_path / "bad", lambda tensors: tensors.__setitem__(key, value))
    trained_model(spec, seed=7).save_pretrained(tmp_path / "good", safe_serialization=True)
    model = PeftModel.from_pretrained(spec.make(), tmp_path / "good", adapter_name="A").eval()
    before = _snapshot(model)

    with pytest.raises(IncompatibleExtraState) as info:
        model.load_adapter(tmp_path / "bad", adapter_name="B")

    assert [m.key for m in info.value.mismatches] == [key]
    assert expected in str(info.value)
    assert "Fix:" in str(info.value)
    assert "B" not in model.peft_config
    _assert_untouched(model, before)


def test_without_peft_buffers_a_ghost_key_is_dropped_silently(stock, tmp_path):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path, safe_serialization=True)
    _tamper(tmp_path, lambda tensors: tensors.__setitem__(f"{PREFIX}ghost.weight", torch.ones(3)))
    PeftModel.from_pretrained(spec.make(), tmp_path)  # no error: the key is lost without a word


def test_check_values_false_loads_a_diverged_file(tmp_path):
    spec = ZOO["mixed_norms"]
    peft_buffers.enable()
    trained_model(spec).save_pretrained(tmp_path, safe_serialization=True)
    nan = torch.tensor([float("nan")] * 16)
    _tamper(tmp_path, lambda tensors: tensors.__setitem__(f"{BN}.running_var", nan))
    with pytest.raises(IncompatibleExtraState):
        PeftModel.from_pretrained(spec.make(), tmp_path)
    peft_buffers.enable(check_values=False)  # the explicit opt-out
    try:
        loaded = PeftModel.from_pretrained(spec.make(), tmp_path)
    finally:
        peft_buffers.disable()
    assert torch.isnan(loaded.base_model.model.bn1d.running_var).all()


def test_inspect_lists_base_biases_under_their_real_kind(enabled, tmp_path):
    # bias="lora_only": PEFT saves the biases of wrapped layers; a frozen base bias elsewhere that the file
    # overwrites is a direct parameter and must not hide among the adapter tensors.
    spec = ZOO["mixed_norms"]
    model = trained_model(spec, bias="lora_only")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / ADAPTER_FILE))
    peft_biases = {key for key in tensors if key.endswith(".bias")}  # what this PEFT release saves (0.7: none)
    tensors[f"{BN}.bias"] = torch.zeros(16)  # bn1d is no LoRA layer: this writes a frozen base bias
    save_file(tensors, str(tmp_path / ADAPTER_FILE), metadata={"format": "pt"})

    summary = inspect_adapter(tmp_path)

    assert [i.key for i in summary.direct] == [f"{BN}.bias"]
    assert {i.key for i in summary.peft_base} == peft_biases
    assert not any(i.key.endswith(".bias") for i in summary.adapter)


def test_inspect_has_a_changed_buffers_group(enabled, tmp_path):
    from tests.binding.test_changed_state import lora, train

    model = lora("spectral")
    train(model, "spectral")
    model.save_pretrained(tmp_path, safe_serialization=True)
    summary = inspect_adapter(tmp_path)
    assert {i.key for i in summary.buffers} == {f"{PREFIX}{k}" for k in (
        "conv.parametrizations.weight.0._u", "conv.parametrizations.weight.0._v", "old.weight_u", "old.weight_v")}
    assert "  changed buffers           4 tensors            180 bytes" in summary.render()
