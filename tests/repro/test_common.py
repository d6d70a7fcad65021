"""Names, bitwise comparison and output flattening shared by the reproducibility tools."""

from __future__ import annotations

import torch

from peft_buffers.repro._common import adapter_tensors, base_tensors, bitwise_equal, display_name, iter_tensors

from .models import lora, make_norm_net


def test_display_names_drop_the_peft_prefix_and_base_layer_hops():
    assert display_name("base_model.model.fc1.base_layer.weight", "base_model.model.") == "fc1.weight"
    assert display_name("base_model.model.fc1.lora_A.default.weight", "base_model.model.") == (
        "fc1.lora_A.default.weight"
    )
    assert display_name("base_layer.weight", "") == "weight"
    assert display_name("encoder.base_layers.0.weight", "") == "encoder.base_layers.0.weight"


def test_base_and_adapter_tensors_split_the_model():
    model = lora(make_norm_net)
    base = base_tensors(model)
    assert [e.name for e in base.values()] == [
        "fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked", "head.weight", "head.bias",
    ]
    assert [e.name for e in adapter_tensors(model, base).values()] == [
        "fc1.lora_A.default.weight", "fc1.lora_B.default.weight"
    ]


def test_bitwise_equal_compares_bytes_shape_and_dtype():
    nan = torch.tensor([float("nan"), 1.0])
    assert bitwise_equal(nan, nan.clone())
    assert not bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not bitwise_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not bitwise_equal(torch.zeros(2), torch.zeros(1, 2))


def test_outputs_are_flattened_with_their_paths():
    output = {"logits": torch.ones(1), "extra": (torch.zeros(1), [torch.ones(2)]), "cache": object()}
    assert [path for path, _ in iter_tensors(output)] == ["output.logits", "output.extra[0]", "output.extra[1][0]"]
