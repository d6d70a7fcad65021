"""peft_buffers' warnings say what happened (which call, why the base values are unknown), with correct counts.

pyproject.toml makes any other PeftBuffersWarning a test failure, so a warning raised where nothing is saved
(``audit``, ``check_reload``) fails the tests that run them.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import LoraConfig, LoraModel, get_peft_model
from peft.utils import save_and_load
from safetensors.torch import load_file
from torch import nn

import peft_buffers
from peft_buffers import PeftBuffersWarning

from .._warnings import first_seen

ADAPTER_FILE = "adapter_model.safetensors"


def two_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def two_norms() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def lora(make=two_linear) -> nn.Module:
    return get_peft_model(make(), LoraConfig(target_modules=["0"]))


def step(model: nn.Module) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    model(torch.randn(8, 4)).square().mean().backward()
    torch.optim.SGD(trainable, lr=0.1).step()


def test_a_save_of_a_model_created_before_enable_counts_in_the_singular_and_warns_once(tmp_path):
    model = lora()
    model.get_base_model()[2].bias.requires_grad_(True)  # one trainable base parameter, no statistics
    step(model)
    peft_buffers.enable()
    with pytest.warns(PeftBuffersWarning, match=first_seen(1)):  # "(1 tensor)", not "(1 tensors)"
        model.save_pretrained(tmp_path / "first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model, not at every save
        model.save_pretrained(tmp_path / "second", safe_serialization=True)  # PEFT < 0.7 writes .bin by default
    assert "base_model.model.2.bias" in load_file(str(tmp_path / "second" / ADAPTER_FILE))


def test_extra_state_dict_of_a_model_created_without_peft_buffers_says_it_is_a_query_not_a_save(tmp_path):
    model = lora(two_norms)
    step(model)
    with pytest.warns(PeftBuffersWarning, match=first_seen(
            6, seen="at a peft_buffers.extra_state_dict call", query=True)):
        keys = set(peft_buffers.extra_state_dict(model))
    assert keys == {f"base_model.model.{m}.{b}" for m in (1, 3)
                    for b in ("running_mean", "running_var", "num_batches_tracked")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(peft_buffers.extra_state_dict(model)) == keys  # said once
    peft_buffers.enable()
    # The file is another matter: the save says it too, naming where the model was first seen.
    with pytest.warns(PeftBuffersWarning, match=first_seen(6, seen="at a peft_buffers.extra_state_dict call")):
        model.save_pretrained(tmp_path)


def test_a_model_first_seen_at_a_load_says_so_at_its_save(tmp_path):
    peft_buffers.enable()
    trained = lora(two_norms)
    step(trained)
    trained.save_pretrained(tmp_path / "adapter")
    peft_buffers.disable()
    model = lora(two_norms)  # created while peft_buffers was not enabled
    peft_buffers.enable()
    model.load_adapter(tmp_path / "adapter", adapter_name="default")  # a load: no warning
    with pytest.warns(PeftBuffersWarning, match=first_seen(6, seen="when an adapter was loaded into it")):
        model.save_pretrained(tmp_path / "again")


def test_a_tuner_built_directly_is_named_with_what_peft_buffers_attaches_to(enabled):
    model = LoraModel(two_linear(), LoraConfig(target_modules=["0"]), "default")
    model.model[2].bias.requires_grad_(True)
    why = ("peft_buffers attaches to a PeftModel, or at transformers' add_adapter / load_adapter, and this "
           "LoraModel was built otherwise")
    with pytest.warns(PeftBuffersWarning, match=first_seen(1, why=why)):
        state = save_and_load.get_peft_model_state_dict(model)
    assert "model.2.bias" in state


def test_changes_no_adapter_owns_are_named_first_then_counted(enabled, tmp_path):
    model = lora(two_norms)
    with model.disable_adapter():
        model(torch.randn(8, 4))  # train mode: both BatchNorms move while no adapter is active
    names = [f"base_model.model.{m}.{b}" for m in (1, 3) for b in ("num_batches_tracked", "running_mean",
                                                                     "running_var")]
    expected = ("peft_buffers: 6 base-model tensors changed while no adapter was active (e.g. training inside "
                "disable_adapter()): no adapter file carries them, and the base model computes with the changed "
                f"values now: {', '.join(names[:5])}, ... (1 more)")
    with pytest.warns(PeftBuffersWarning, match="^" + re.escape(expected) + "$"):
        model.save_pretrained(tmp_path)


def test_reports_on_a_stock_model_do_not_warn(stock, tmp_path):
    # audit and check_reload read what peft_buffers would save; they save nothing the user keeps, and their
    # reports say what matters: no warning (pyproject.toml turns one into a failure).
    model = lora(two_norms)
    with peft_buffers.audit(model) as report:
        step(model)
    assert report.peft_buffers_enabled is False and len(report.not_saved) == 6
    reloaded = peft_buffers.check_reload(model, torch.randn(2, 4), two_norms)
    assert reloaded.kinds[0] == "extra_state_missing"
