"""Every PEFT call that changes which adapter computes keeps the extra state right, or says what it does not.

Each scenario runs on the mixed-norms model (BatchNorm1d/2d, InstanceNorm with statistics), with a stock contrast
where stock PEFT differs. Guards https://github.com/huggingface/peft/issues/1732 (statistics shared by every
adapter, lost on reload) on the paths beyond set_adapter/disable_adapter: unload, the method form of disabling,
PeftMixedModel, several active adapters, add_weighted_adapter, copies.
"""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from packaging.version import Version

from peft_buffers import PeftBuffersWarning

from .._compat import PEFT_VERSION
from ..zoo import ZOO, logits, train, tuner_config

SPEC = ZOO["mixed_norms"]
X = SPEC.inputs(seed=99)
STATS = ("bn1d.running_mean", "bn2d.running_var", "inorm.running_mean")


def trained_file(tmp_path, name: str, seed: int):
    """A LoRA adapter trained ``seed``-wise from the seeded base, saved under ``tmp_path/name``; its logits."""
    from peft import get_peft_model

    model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC))
    train(model, SPEC, seed=seed)
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return tmp_path / name, logits(model.eval(), X)


def base_logits():
    return logits(SPEC.make().eval(), X)


def loaded(tmp_path, *names_and_seeds):
    """A PeftModel with each ``(name, seed)`` adapter trained, saved and loaded; the first one active."""
    from peft import PeftModel

    files = {name: trained_file(tmp_path, name, seed) for name, seed in names_and_seeds}
    first = names_and_seeds[0][0]
    model = PeftModel.from_pretrained(SPEC.make(), files[first][0], adapter_name=first)
    for name, _ in names_and_seeds[1:]:
        model.load_adapter(files[name][0], adapter_name=name)
    return model.eval(), {name: out for name, (_, out) in files.items()}


def base_state(model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k: v.clone() for k, v in base.state_dict().items() if any(k.endswith(s) for s in STATS)}


# ----------------------------------------------------------------------------------------------------- unload


def test_unload_returns_the_base_model_with_its_own_values(enabled, tmp_path):
    model, _ = loaded(tmp_path, ("a", 1))
    base = model.unload()
    assert torch.equal(logits(base.eval(), X), base_logits())


def trained(seed: int = 1):
    from peft import get_peft_model

    model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC))
    train(model, SPEC, seed=seed)
    return model.eval()


@pytest.mark.parametrize("mode", ["enabled", "stock"])
def test_unload_after_training_returns_the_base_models_own_statistics(request, mode):
    request.getfixturevalue(mode)
    base = trained().unload()
    # stock PEFT: training moved the base model's statistics, and unload() returns them as they are
    assert torch.equal(logits(base.eval(), X), base_logits()) is (mode == "enabled")


def test_the_peft_model_keeps_the_adapters_state_after_unload(enabled, tmp_path):
    import peft_buffers

    model, _ = loaded(tmp_path, ("a", 1))
    before = {k: v.clone() for k, v in peft_buffers.extra_state_dict(model, "a").items()}
    model.unload()
    after = peft_buffers.extra_state_dict(model, "a")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_merge_and_unload_keeps_the_merged_adapters_state(enabled, tmp_path):
    model, expected = loaded(tmp_path, ("a", 1))
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged.eval(), X), expected["a"], atol=1e-5)  # merging itself rounds


# --------------------------------------------------------------------------------------- disable_adapter_layers


def test_disable_adapter_layers_computes_with_the_base_models_values(enabled, tmp_path):
    model, expected = loaded(tmp_path, ("a", 1))
    model.base_model.disable_adapter_layers()
    assert torch.equal(logits(model, X), base_logits())
    model.base_model.enable_adapter_layers()
    assert torch.equal(logits(model, X), expected["a"])


@pytest.mark.parametrize("mode", ["enabled", "stock"])
def test_disable_adapter_layers_after_training_computes_with_the_base_models_statistics(request, mode):
    request.getfixturevalue(mode)
    model = trained()
    model.base_model.disable_adapter_layers()
    assert torch.equal(logits(model, X), base_logits()) is (mode == "enabled")


def test_disable_adapter_inside_disabled_layers_stays_disabled(enabled, tmp_path):
    model, expected = loaded(tmp_path, ("a", 1))
    model.base_model.disable_adapter_layers()
    with model.disable_adapter():
        assert torch.equal(logits(model, X), base_logits())
    if PEFT_VERSION >= Version("0.18"):
        # PEFT 0.18+ re-enables only layers that were enabled before the context
        assert torch.equal(logits(model, X), base_logits())
    model.base_model.enable_adapter_layers()
    assert torch.equal(logits(model, X), expected["a"])


# ------------------------------------------------------------------------------------------- PeftMixedModel


def test_a_mixed_model_is_attached_at_construction_and_disables_to_the_base(enabled, tmp_path, recwarn):
    from peft import get_peft_model

    if not hasattr(peft, "PeftMixedModel"):
        pytest.skip("PEFT 0.6 has no PeftMixedModel")
    model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC), mixed=True)
    train(model, SPEC, seed=1)
    trained = logits(model.eval(), X)
    with model.disable_adapter():
        assert torch.equal(logits(model, X), base_logits())
    assert torch.equal(logits(model, X), trained)
    assert not [w for w in recwarn if issubclass(w.category, PeftBuffersWarning)]


def test_a_mixed_model_keeps_the_adapters_statistics_when_disabled_with_stock_peft(stock):
    from peft import get_peft_model

    if not hasattr(peft, "PeftMixedModel"):
        pytest.skip("PEFT 0.6 has no PeftMixedModel")
    model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC), mixed=True)
    train(model, SPEC, seed=1)
    with model.eval().disable_adapter():
        assert not torch.equal(logits(model, X), base_logits())


def test_a_mixed_model_switches_each_adapters_own_state(enabled, tmp_path):
    if not hasattr(peft, "PeftMixedModel"):
        pytest.skip("PEFT 0.6 has no PeftMixedModel")
    from peft import PeftMixedModel

    files = {name: trained_file(tmp_path, name, seed) for name, seed in (("a", 1), ("b", 7))}
    model = PeftMixedModel.from_pretrained(SPEC.make(), files["a"][0], adapter_name="a")
    model.load_adapter(files["b"][0], adapter_name="b")
    for name in ("b", "a", "b"):
        model.set_adapter(name)
        assert torch.equal(logits(model.eval(), X), files[name][1]), name
    model.delete_adapter("a")
    assert torch.equal(logits(model, X), files["b"][1])


# ------------------------------------------------------------------------------ several adapters active at once


def group_training(model, order):
    model.base_model.set_adapter(list(order))
    train(model, SPEC, seed=11)


def test_a_change_made_while_several_adapters_are_active_is_saved_with_each_and_said(enabled, tmp_path):
    from peft import get_peft_model

    model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC), adapter_name="one")
    model.add_adapter("two", tuner_config("lora", SPEC))
    group_training(model, ["two", "one"])
    joint = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "running" in k}
    with pytest.warns(PeftBuffersWarning) as record:
        model.save_pretrained(tmp_path, safe_serialization=True)
    said = [str(w.message) for w in record if "active together" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(
        "peft_buffers: 8 tensors changed while adapters 'two', 'one' were active together; they belong to each of "
        "them, and each adapter's file carries them: base_model.model.bn1d.num_batches_tracked")
    from safetensors.torch import load_file

    for name in ("one", "two"):  # no adapter is called "default": each file is in a folder of its name
        saved = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        for key, value in joint.items():
            assert torch.equal(saved[f"base_model.model.{key}"], value), (name, key)


def test_with_stock_peft_only_one_of_several_active_adapters_gets_the_change(stock, tmp_path):
    from peft import get_peft_model
    from safetensors.torch import load_file

    model = get_peft_model(SPEC.make(), tuner_config("lora", SPEC), adapter_name="one")
    model.add_adapter("two", tuner_config("lora", SPEC))
    group_training(model, ["two", "one"])
    model.save_pretrained(tmp_path, safe_serialization=True)
    keys = set(load_file(str(tmp_path / "one" / "adapter_model.safetensors")))
    assert not any("running_mean" in k for k in keys)  # stock PEFT saves no statistics at all


def test_the_first_active_adapters_state_is_live_and_the_others_are_named(enabled, tmp_path):
    model, expected = loaded(tmp_path, ("a", 1), ("b", 7))
    message = re.escape("adapters 'b', 'a' are active together, and only 'b''s extra state is live")
    with pytest.warns(PeftBuffersWarning, match=message):
        model.base_model.set_adapter(["b", "a"])
    b_state = base_state(model)
    model.set_adapter("b")
    assert all(torch.equal(v, base_state(model)[k]) for k, v in b_state.items())


# ---------------------------------------------------------------------------------------- add_weighted_adapter


def test_add_weighted_adapter_says_the_combination_carries_no_extra_state(enabled, tmp_path):
    model, _ = loaded(tmp_path, ("a", 1), ("b", 7))
    with pytest.warns(PeftBuffersWarning, match=r"add_weighted_adapter.*'ab'.*'a': .*running_mean"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="linear")
    model.set_adapter("ab")
    assert base_state(model).keys() and all(
        torch.equal(v, base_state(SPEC.make())[k]) for k, v in base_state(model).items())


# ---------------------------------------------------------------------------------------------- copies


def test_a_deep_copy_has_its_own_state_with_the_right_base_values(enabled, recwarn):
    from peft import get_peft_model

    spec = ZOO["vit"]
    x = spec.inputs(seed=5)
    model = get_peft_model(spec.make(), tuner_config("lora", spec))
    model.get_base_model().vit.embeddings.position_embeddings.requires_grad_(True)
    ema = copy.deepcopy(model).eval()  # what EMA helpers do: a copy made before training, updated in place
    for p in ema.parameters():
        p.requires_grad_(False)
    train(model, spec, seed=3)
    with torch.no_grad():
        for mine, theirs in zip(ema.parameters(), model.parameters()):
            mine.lerp_(theirs, 0.5)
    with ema.disable_adapter():
        assert torch.equal(logits(ema, x), logits(spec.make().eval(), x))
    with model.disable_adapter():
        assert torch.equal(logits(model.eval(), x), logits(spec.make().eval(), x))
    assert not [w for w in recwarn if issubclass(w.category, PeftBuffersWarning)]


def test_a_deep_copy_keeps_the_trained_parameter_when_disabled_with_stock_peft(stock):
    from peft import get_peft_model

    spec = ZOO["vit"]
    x = spec.inputs(seed=5)
    model = get_peft_model(spec.make(), tuner_config("lora", spec))
    model.get_base_model().vit.embeddings.position_embeddings.requires_grad_(True)
    ema = copy.deepcopy(model).eval()
    train(model, spec, seed=3)
    with torch.no_grad():
        for mine, theirs in zip(ema.parameters(), model.parameters()):
            mine.lerp_(theirs, 0.5)
    with ema.disable_adapter():
        assert not torch.equal(logits(ema, x), logits(spec.make().eval(), x))
