"""peft_buffers.check_reload: each cause built on purpose must be named first; a clean reload is ok."""

from __future__ import annotations

import pytest
import torch

import peft_buffers

from .models import (
    inputs,
    lora,
    make_norm_net,
    make_tiny_llama,
    make_two_linear,
    token_inputs,
    train,
    train_llama,
)


def trained(make_base, **config):
    model = lora(make_base, **config)
    train(model)
    return model


def test_clean_reload_is_ok_with_no_causes(enabled):
    # https://github.com/huggingface/peft/issues/1732: with peft_buffers the statistics travel
    model = trained(make_norm_net)
    report = peft_buffers.check_reload(model, inputs(), make_norm_net)
    assert report.ok and report.equal and report.causes == []
    assert report.max_abs_diff == 0.0
    assert str(report).splitlines()[0] == (
        "peft_buffers.check_reload: OK: outputs are bitwise equal after reload (1 output tensor; compared in "
        "eval mode without grad, adapter 'default')"
    )


def test_missing_statistics_are_named_first(stock):
    # https://github.com/huggingface/peft/issues/1732: saved with peft_buffers disabled
    model = trained(make_norm_net)
    report = peft_buffers.check_reload(model, inputs(), make_norm_net)
    assert not report.ok and not report.equal and report.max_abs_diff > 0
    assert report.kinds == ["extra_state_missing"]
    cause = report.causes[0]
    assert [line.split(" (")[0] for line in cause.evidence] == [
        "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    ]
    assert cause.evidence[0].startswith("bn.running_mean (running statistic): 16 of 16 values differ")
    assert cause.fix.startswith("call peft_buffers.enable() before save_pretrained()")


def test_missing_direct_parameters_are_named_first(stock):
    # https://github.com/huggingface/peft/issues/2099: a trained base parameter that the file does not carry
    model = lora(make_two_linear)
    for param in model.base_model.model.head.parameters():
        param.requires_grad_(True)
    train(model)
    report = peft_buffers.check_reload(model, inputs(), make_two_linear)
    assert report.kinds == ["extra_state_missing"]
    assert [line.split(":")[0] for line in report.causes[0].evidence] == [
        "head.weight (direct parameter)", "head.bias (direct parameter)"
    ]


def test_a_perturbed_base_weight_is_named_first(enabled):
    model = trained(make_norm_net)

    def perturbed_base():
        base = make_norm_net()
        with torch.no_grad():
            base.head.weight[1, 2] += 1e-3
        return base

    report = peft_buffers.check_reload(model, inputs(), perturbed_base)
    assert not report.equal
    assert report.kinds == ["base_weights_differ"]
    assert report.causes[0].evidence == ("head.weight (parameter): 1 of 48 values differ, max |Δ| 0.001",)


def test_train_mode_lora_dropout_after_is_trainable_load_is_named_first(enabled):
    # https://github.com/huggingface/peft/issues/2438: lora_dropout=0.5 loaded with is_trainable=True
    model = trained(make_two_linear, lora_dropout=0.5)
    report = peft_buffers.check_reload(model, inputs(), make_two_linear, is_trainable=True)
    assert report.equal  # in eval mode the reload is exact ...
    assert not report.ok  # ... but as loaded it is not deterministic
    assert report.kinds == ["not_deterministic"]
    cause = report.causes[0]
    assert cause.title.startswith("the reloaded model is not deterministic as loaded: it was loaded with "
                                  "is_trainable=True and it is in train mode, and two forward passes differ")
    assert cause.evidence[0].startswith("1 PEFT lora_dropout (adapter 'default') module with p=0.5 in train mode drops")
    assert cause.fix.startswith("call model.eval() before predicting")


def test_train_mode_norms_after_is_trainable_load_are_named_first(enabled):
    model = trained(make_norm_net)
    report = peft_buffers.check_reload(model, inputs(), make_norm_net, is_trainable=True)
    assert report.equal and report.kinds == ["not_deterministic"]
    assert "its outputs in that mode differ from eval mode" in report.causes[0].title
    assert report.causes[0].evidence[0].startswith("1 BatchNorm1d layer in train mode normalises")


def test_a_base_in_another_dtype_is_named_first(enabled):
    model = lora(make_tiny_llama, target_modules=["q_proj", "v_proj"])
    train_llama(model)
    report = peft_buffers.check_reload(model, token_inputs(), lambda: make_tiny_llama(torch.bfloat16))
    assert not report.equal
    assert report.kinds[0] == "dtype_differs"
    assert report.causes[0].evidence[0] == "12 tensors: torch.float32 in training, torch.bfloat16 after reload"
    assert report.causes[0].fix.startswith("create the base model in float32 as in training")


def test_a_merged_adapter_is_named_first(enabled):
    model = trained(make_norm_net).eval()
    model.merge_adapter()
    report = peft_buffers.check_reload(model, inputs(), make_norm_net)
    assert report.kinds == ["adapter_merged"]
    assert report.causes[0].evidence == ("layers: fc1",)


def test_several_adapters_are_saved_and_the_active_one_compared(enabled):
    from peft import LoraConfig

    model = lora(make_norm_net)
    model.add_adapter("other", LoraConfig(target_modules=["head"]))
    model.set_adapter("other")
    train(model)
    report = peft_buffers.check_reload(model, inputs(), make_norm_net)
    assert report.adapter_name == "other"
    assert report.ok, str(report)


def test_random_state_and_module_modes_are_left_as_they_were(enabled):
    model = trained(make_two_linear, lora_dropout=0.5)
    model.base_model.model.head.eval()  # a user's own per-module choice
    modes = [m.training for m in model.modules()]
    state = torch.get_rng_state()
    peft_buffers.check_reload(model, inputs(), make_two_linear)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes


def test_a_model_that_is_not_a_peft_model_is_refused():
    with pytest.raises(TypeError, match="check_reload needs a peft.PeftModel"):
        peft_buffers.check_reload(make_two_linear(), inputs(), make_two_linear)


# --------------------------------------------------------------------------------- 4-bit QLoRA (bitsandbytes)


def _bitsandbytes_4bit_device() -> str:
    """CUDA when there is one, else CPU when this bitsandbytes runs 4-bit layers there (0.50.2 does)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    if torch.cuda.is_available():
        return "cuda"
    try:
        bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")(torch.zeros(1, 64))
    except Exception as error:  # noqa: BLE001 - any failure means: no 4-bit CPU backend here
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run a 4-bit layer on CPU here "
                    f"({type(error).__name__}: {error}) and CUDA is not available")
    return "cpu"


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)  # 4-bit kernels need >= 64
    return path


def qlora_base(path, device: str, **settings):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    config.update(settings)
    return lambda: AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**config), device_map=device
    )


def test_a_different_bitsandbytes_config_is_named_first(enabled, llama_checkpoint):
    # The Gemma-2B QLoRA report: reloaded with another BitsAndBytesConfig, predictions differ
    device = _bitsandbytes_4bit_device()
    model = lora(qlora_base(llama_checkpoint, device), target_modules=["q_proj", "v_proj"], r=4)
    with peft_buffers.audit(model) as audit_report:
        train_llama(model)
    audit_report.assert_only_adapters_changed()
    ids = {k: v.to(device) for k, v in token_inputs().items()}

    same = peft_buffers.check_reload(model, ids, qlora_base(llama_checkpoint, device))
    assert same.ok, str(same)

    other_type = peft_buffers.check_reload(model, ids, qlora_base(llama_checkpoint, device, bnb_4bit_quant_type="fp4"))
    assert not other_type.equal
    assert other_type.kinds == ["quantization_differs"]
    assert other_type.causes[0].evidence[0] == "quant type (bnb_4bit_quant_type): 'nf4' in training, 'fp4' after reload"
    assert "bnb_4bit_quant_type='nf4'" in other_type.causes[0].fix

    other_settings = peft_buffers.check_reload(model, ids, qlora_base(
        llama_checkpoint, device, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    assert other_settings.kinds[0] == "quantization_differs"
    assert other_settings.causes[0].evidence[:2] == (
        "double quant (bnb_4bit_use_double_quant): False in training, True after reload",
        "compute dtype (bnb_4bit_compute_dtype): 'float32' in training, 'bfloat16' after reload",
    )
