"""Issue 11 (b): PEFT's own ``save_running_stats`` / ``parameters_to_save`` (patches/peft-v0.22.0) give, without
peft_buffers, bitwise the same files and reloads as peft_buffers gives on stock configs.

Guards https://github.com/huggingface/peft/issues/1732 (BatchNorm statistics) and #2099 (direct parameters).
Runs only where the patched PEFT is installed: ``nox -s upstream``.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import peft_buffers
from peft_buffers.binding import peft_has_native_fields
from tests.zoo import ZOO, logits

from . import _scenarios as sc

pytestmark = pytest.mark.skipif(
    not peft_has_native_fields(),
    reason="needs a PEFT with save_running_stats / parameters_to_save (patches/peft-v0.22.0): run `nox -s upstream`",
)

ADAPTER_FILE = "adapter_model.safetensors"


def saved(path):
    return load_file(str(path / ADAPTER_FILE))


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every scenario trained and saved once per mode: {mode: (directory, expected outputs)}."""
    result = {}
    try:
        for mode in sc.MODES:
            sc.set_mode(mode)
            out = tmp_path_factory.mktemp(mode)
            result[mode] = (out, sc.write(mode, out))
    finally:
        peft_buffers.disable()
    return result


@pytest.mark.parametrize("model_name", ["resnet", "vit"])
def test_native_file_equals_peft_buffers_file(written, model_name):
    native_dir, native_expected = written["native"]
    ours_dir, ours_expected = written["peft_buffers"]
    assert torch.equal(native_expected[model_name], ours_expected[model_name])  # the same training
    assert_same_tensors(saved(native_dir / model_name), saved(ours_dir / model_name))


def test_native_file_carries_statistics_and_parameters(written):
    native_dir, _ = written["native"]
    keys = set(saved(native_dir / "vit"))
    assert {"base_model.model.vit.embeddings.position_embeddings", "base_model.model.vit.embeddings.cls_token"} <= keys
    assert not any(".patch_embeddings." in k for k in keys)  # the parameters alone, not their module
    resnet_keys = set(saved(native_dir / "resnet"))
    assert "base_model.model.resnet.embedder.embedder.normalization.running_mean" in resnet_keys
    assert "base_model.model.resnet.embedder.embedder.normalization.num_batches_tracked" in resnet_keys


@pytest.mark.parametrize("mode", sc.MODES)
def test_reload_is_bitwise_in_both_modes(written, mode):
    out, expected = written[mode]
    try:
        sc.set_mode(mode)
        outputs = sc.reload_outputs(mode, out)
    finally:
        peft_buffers.disable()
    assert sc.mismatches(expected, outputs) == []


def test_native_and_peft_buffers_reload_to_the_same_outputs(written):
    reloaded = {}
    try:
        for mode in sc.MODES:
            sc.set_mode(mode)
            reloaded[mode] = sc.reload_outputs(mode, written[mode][0])
    finally:
        peft_buffers.disable()
    assert sorted(reloaded["native"]) == sorted(reloaded["peft_buffers"])
    for key, output in reloaded["native"].items():
        assert torch.equal(output, reloaded["peft_buffers"][key]), key


def test_without_either_the_reload_differs(tmp_path):
    # the failure both fix: stock config, peft_buffers disabled
    sc.set_mode("native")
    spec = ZOO["resnet"]
    model = sc.trained("peft_buffers", "resnet")  # a stock config: no field turned on
    x = spec.inputs(seed=99)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(spec.make(), tmp_path).eval()
    assert not torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("mode", sc.MODES)
def test_disable_adapter_after_training_gives_the_base_model(mode):
    spec = ZOO["mixed_norms"]
    x = spec.inputs(seed=99)
    try:
        sc.set_mode(mode)
        model = sc.trained(mode, "mixed_norms")
        trained_output = logits(model, x)
        with model.disable_adapter():
            assert torch.equal(logits(model, x), logits(spec.make().eval(), x))
        assert torch.equal(logits(model, x), trained_output)
    finally:
        peft_buffers.disable()


@pytest.mark.parametrize("is_trainable", [False, True])
def test_native_vit_parameters_trainable_only_when_asked(written, is_trainable):
    spec = ZOO["vit"]
    loaded = PeftModel.from_pretrained(spec.make(), written["native"][0] / "vit", is_trainable=is_trainable)
    embeddings = loaded.get_base_model().vit.embeddings
    assert embeddings.position_embeddings.requires_grad is is_trainable
    assert embeddings.cls_token.requires_grad is is_trainable


def test_peft_buffers_steps_aside_for_native_fields(tmp_path):
    # issue 11: with both on, peft_buffers leaves models whose adapters use PEFT's own fields to PEFT
    # (switching adapters was off by 0.145 when both handled the state).
    peft_buffers.enable()
    try:
        expected = sc.write("native", tmp_path)
        outputs = sc.reload_outputs("native", tmp_path)
    finally:
        peft_buffers.disable()
    assert sc.mismatches(expected, outputs) == []
