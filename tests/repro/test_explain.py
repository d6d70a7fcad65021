"""peft_buffers.explain: what makes outputs mode- or run-dependent right now."""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

import peft_buffers

from .models import lora, make_norm_net, make_two_linear, tiny_llama_config


def test_lora_dropout_in_train_mode_is_named_with_its_fix(tmp_path):
    # https://github.com/huggingface/peft/issues/2438: loaded with is_trainable=True, the model stays in train
    # mode and lora_dropout is active
    lora(make_two_linear, lora_dropout=0.5).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_two_linear(), tmp_path, is_trainable=True)
    found = peft_buffers.explain(loaded)
    assert found.kinds == ["lora_dropout"]
    assert found.findings[0].modules == ("fc1.lora_dropout.default",)
    assert str(found).splitlines()[1] == (
        "  - 1 PEFT lora_dropout (adapter 'default') module with p=0.5 in train mode drops random activations "
        "on every forward (PEFT leaves a model loaded with is_trainable=True in train mode) "
        "(in fc1.lora_dropout.default). Fix: call model.eval() before predicting, or set lora_dropout=0 in the "
        "LoraConfig."
    )
    loaded.eval()
    assert not peft_buffers.explain(loaded)
    assert str(peft_buffers.explain(loaded)) == (
        "peft_buffers.explain: nothing makes this model's outputs mode- or run-dependent right now."
    )


def test_plain_dropout_and_train_mode_norms():
    net = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.1), nn.BatchNorm1d(4), nn.Dropout(0.0))
    found = peft_buffers.explain(net)
    assert found.kinds == ["dropout", "norm_train_mode"]
    assert [f.modules for f in found] == [("1",), ("2",)]  # p=0 drops nothing: not listed
    assert all(". Fix: call model.eval() before predicting." in str(f) for f in found)


def test_merged_and_disabled_adapters():
    model = lora(make_norm_net).eval()
    model.merge_adapter()
    assert peft_buffers.explain(model).kinds == ["adapter_merged"]
    assert peft_buffers.explain(model).findings[0].modules == ("fc1",)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert peft_buffers.explain(model).kinds == ["adapters_disabled"]
    assert peft_buffers.explain(model).kinds == []


def test_functional_attention_dropout_and_sampling():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(attention_dropout=0.1)).train()
    llm.generation_config.do_sample = True
    found = peft_buffers.explain(llm)
    assert found.kinds == ["functional_dropout", "sampling"]
    assert found.findings[0].modules == ("model.layers.0.self_attn",)
    llm.eval()
    assert peft_buffers.explain(llm).kinds == ["sampling"]
