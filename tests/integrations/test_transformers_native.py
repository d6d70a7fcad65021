"""transformers-native adapters (``model.add_adapter`` / ``save_pretrained`` / ``load_adapter`` / ``set_adapter``).

transformers 5.x ``load_adapter`` loads through its own weight loader, never through
``set_peft_model_state_dict``; peft_buffers hooks it (``_registry.TRANSFORMERS_REGISTRY``). transformers 4.x
loads through ``set_peft_model_state_dict``. The same tests run on both, in their own environments:
``nox -s transformers_native`` (transformers 5.25.0 and 4.57.6 with PEFT 0.22.0, 5.23.0 with PEFT 0.21.2).
Guards https://github.com/huggingface/peft/issues/1732 (statistics) and /issues/2099 (direct parameters).
"""

from __future__ import annotations

import itertools
import os
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from peft_buffers import IncompatibleExtraState
from peft_buffers.core import PENDING_NAME

from .._atomic import FailAt
from .._compat import native_adapters_refused
from ._tiny import STEM_NORM, logits, lora_config, resnet, train_steps

TRANSFORMERS = Version(version("transformers"))
PEFT = Version(version("peft"))


if native_adapters_refused():  # transformers 5.24 refuses PEFT < 0.22: the nox sessions pin 5.23 for 0.21
    pytest.skip(native_adapters_refused() + "; run `nox -s transformers_native`", allow_module_level=True)

FILE = "adapter_model.safetensors"
STAT = f"base_model.model.{STEM_NORM}.running_mean"
DIRECT = f"base_model.model.{STEM_NORM}.weight"


def trained_native(seed: int, **config):
    """Base weights from seed 0, an adapter "a" trained with ``seed``, the stem norm's weight unfrozen."""
    model = resnet(0)
    model.add_adapter(lora_config(**config), adapter_name="a")
    model.get_submodule(STEM_NORM).weight.requires_grad_(True)
    train_steps(model, seed)
    return model


MODULES_TO_SAVE = {"modules_to_save": ["stages.1.layers.0.shortcut.normalization"]}


def save_two_adapters(path, **config):
    """Adapters "a" and "b" trained on different data from the same base; their reference outputs."""
    refs = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = trained_native(seed, **config)
        model.save_pretrained(path / name)
        refs[name] = logits(model)
    refs["base"] = logits(resnet(0))
    return refs


def load_two_adapters(path):
    model = resnet(0)
    model.load_adapter(str(path / "a"), adapter_name="a")
    model.load_adapter(str(path / "b"), adapter_name="b")
    # transformers 5.23 leaves a modules_to_save wrapper with no active adapter after load_adapter (4.57
    # keeps "a" active): activate explicitly.
    model.set_adapter("a")
    return model


# https://github.com/huggingface/peft/issues/1732 and /issues/2099
def test_load_adapter_gives_the_trained_model(enabled, tmp_path):
    model = trained_native(seed=1)
    model.save_pretrained(tmp_path)
    assert {STAT, DIRECT} <= set(load_file(str(tmp_path / FILE)))

    fresh = resnet(0)
    fresh.load_adapter(str(tmp_path), adapter_name="a")

    assert torch.equal(logits(fresh), logits(model))
    assert torch.equal(fresh.get_submodule(STEM_NORM).weight, model.get_submodule(STEM_NORM).weight)
    assert not fresh.get_submodule(STEM_NORM).weight.requires_grad  # loaded for inference


def _loads_as(path) -> torch.Tensor:
    fresh = resnet(0)
    fresh.load_adapter(str(path), adapter_name="a")
    return logits(fresh)


def test_save_pretrained_of_a_model_with_adapters_replaces_the_folder_atomically(enabled, tmp_path, monkeypatch):
    trained_native(seed=1).save_pretrained(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    old = _loads_as(tmp_path)
    model = trained_native(seed=2)
    new = logits(model)
    assert not torch.equal(old, new)

    failures = 0
    for at in itertools.count(1):  # every move into place fails in turn: the record, the weights, the config
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", FailAt(os.replace, at))
            try:
                model.save_pretrained(tmp_path)
            except OSError as error:
                assert "(injected)" in str(error)
            else:
                break
        failures += 1
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before, f"call {at}"
        assert torch.equal(_loads_as(tmp_path), old), f"call {at}"
    assert failures >= 3
    assert torch.equal(_loads_as(tmp_path), new)
    assert PENDING_NAME not in os.listdir(tmp_path)


@pytest.mark.parametrize("peft_buffers_on", [True, False], ids=["enabled", "stock"])
def test_push_to_hub_names_the_repository_after_the_folder(tmp_path, monkeypatch, peft_buffers_on):
    import transformers.modeling_utils as modeling_utils

    import peft_buffers

    pushed = {}

    class Hub:  # no network: record what transformers would create and upload
        def create_repo(self, repo_id, **kwargs):
            pushed["repo_id"] = repo_id
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        pushed["files"] = sorted(os.listdir(working_dir))

    if hasattr(modeling_utils, "hf_api"):  # transformers 5.x
        monkeypatch.setattr(modeling_utils, "hf_api", Hub)
    else:  # 4.x
        monkeypatch.setattr(modeling_utils.PreTrainedModel, "_create_repo",
                            lambda self, repo_id, **kwargs: Hub().create_repo(repo_id).repo_id)
    monkeypatch.setattr(modeling_utils, "create_and_tag_model_card",
                        lambda *args, **kwargs: type("Card", (), {"save": lambda self, path: None})())
    monkeypatch.setattr(modeling_utils.PreTrainedModel, "_upload_modified_files", upload)
    if peft_buffers_on:
        peft_buffers.enable()

    trained_native(seed=1).save_pretrained(str(tmp_path / "my-adapter"), push_to_hub=True)  # 4.x splits a str

    assert pushed["repo_id"] == "my-adapter"
    assert {FILE, "adapter_config.json"} <= set(pushed["files"])
    assert {FILE, "adapter_config.json"} <= set(os.listdir(tmp_path / "my-adapter"))


# https://github.com/huggingface/peft/issues/1732 (a BatchNorm in modules_to_save stays PEFT's own)
def test_each_adapter_keeps_its_own_extra_state(enabled, tmp_path):
    refs = save_two_adapters(tmp_path, **MODULES_TO_SAVE)
    model = load_two_adapters(tmp_path)

    assert torch.equal(logits(model), refs["a"])
    model.set_adapter("b")
    assert torch.equal(logits(model), refs["b"])
    model.set_adapter("a")
    assert torch.equal(logits(model), refs["a"])


# https://github.com/huggingface/peft/issues/1732. No modules_to_save here: transformers 5.23's
# enable_adapters() re-enables LoRA layers but not modules_to_save wrappers (disable_adapters() disables both).
def test_disable_adapters_computes_with_the_base_models_own_values(enabled, tmp_path):
    refs = save_two_adapters(tmp_path)
    model = load_two_adapters(tmp_path)

    model.disable_adapters()
    assert torch.equal(logits(model), refs["base"])
    model.enable_adapters()
    assert torch.equal(logits(model), refs["a"])


# https://github.com/huggingface/peft/issues/1732
def test_saving_an_inactive_adapter_saves_its_own_statistics(enabled, tmp_path):
    save_two_adapters(tmp_path)
    model = load_two_adapters(tmp_path)

    saved_b = model.get_adapter_state_dict("b")

    assert torch.equal(saved_b[STAT.removeprefix("base_model.model.")],
                       load_file(str(tmp_path / "b" / FILE))[STAT])


def test_delete_adapter_forgets_its_extra_state(enabled, tmp_path):
    refs = save_two_adapters(tmp_path)
    model = load_two_adapters(tmp_path)
    store = model.__dict__["_peft_buffers_store"]
    assert "b" in store.owned

    model.delete_adapter("b")

    assert "b" not in store.owned and "b" not in store.stored
    assert torch.equal(logits(model), refs["a"])


def test_a_bad_file_leaves_the_model_untouched(enabled, tmp_path):
    trained_native(seed=1).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / FILE))
    tensors[STAT] = torch.zeros(5)  # the model's is (8,)
    save_file(tensors, str(tmp_path / FILE), metadata={"format": "pt"})
    model = resnet(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(IncompatibleExtraState, match=r"running_mean.*shape \(8,\).*shape \(5,\)"):
        model.load_adapter(str(tmp_path), adapter_name="a")

    assert not getattr(model, "_hf_peft_config_loaded", False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_stock_file_loads_as_transformers_loads_it(tmp_path):
    import peft_buffers

    peft_buffers.disable()
    trained_native(seed=1).save_pretrained(tmp_path)  # written by stock PEFT: no extra state
    stock = resnet(0)
    stock.load_adapter(str(tmp_path), adapter_name="a")
    peft_buffers.enable()
    try:
        ours = resnet(0)
        ours.load_adapter(str(tmp_path), adapter_name="a")
        assert torch.equal(logits(ours), logits(stock))
    finally:
        peft_buffers.disable()


# https://github.com/huggingface/peft/issues/1732: a file PeftModel wrote loads into a native model too.
def test_a_peft_model_file_loads_natively(enabled, tmp_path):
    from peft import get_peft_model

    peft_model = get_peft_model(resnet(0), lora_config())
    train_steps(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path)

    native = resnet(0)
    native.load_adapter(str(tmp_path), adapter_name="default")

    assert torch.equal(logits(native), logits(peft_model))


# issue 12: doctor suggests a transformers release by the registry's `tested_min_peft`; it must be what that
# release itself declares. The nox sessions pin exactly the tested releases (5.23.0, 4.57.6).
def test_the_registry_records_the_minimum_peft_this_tested_transformers_declares():
    from peft_buffers.binding import mixin_min_peft
    from peft_buffers.binding.registry import transformers_entry_for

    entry = transformers_entry_for(TRANSFORMERS)
    if entry is None or entry.tested != str(TRANSFORMERS):
        pytest.skip(f"transformers {TRANSFORMERS} is no tested release of TRANSFORMERS_REGISTRY; "
                    "run `nox -s transformers_native`")
    assert Version(entry.tested_min_peft) == mixin_min_peft()
