"""peft_buffers.audit: what training changed, and whether the adapter file carries it."""

from __future__ import annotations

import pytest
import torch

import peft_buffers
from peft_buffers.repro._audit import NOT_SAVED, SAVED_BY_PEFT_BUFFERS

from .models import lora, make_norm_net, make_two_linear, train

LORA = ["fc1.lora_A.default.weight", "fc1.lora_B.default.weight"]
STATS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def unfreeze_head(model) -> None:
    """The accident: a base Linear made trainable after get_peft_model."""
    for param in model.base_model.model.head.parameters():
        param.requires_grad_(True)


def test_clean_lora_run_passes_and_lists_what_changed(enabled):
    # https://github.com/huggingface/peft/issues/1732: BatchNorm statistics change in training and are saved
    model = lora(make_norm_net)
    with peft_buffers.audit(model) as report:
        train(model)
    report.assert_only_adapters_changed()
    assert [e.name for e in report.adapters_changed] == LORA
    assert report.adapters_unchanged == []
    assert [(e.name, e.what, e.status) for e in report.base_changed] == [
        (name, "buffer", SAVED_BY_PEFT_BUFFERS) for name in STATS
    ]
    assert report.not_saved == []
    assert report.base_total == 9  # fc1 weight/bias, bn weight/bias/3 stats, head weight/bias


def test_clean_lora_run_without_norms_passes_with_stock_peft(stock):
    model = lora(make_two_linear)
    with peft_buffers.audit(model) as report:
        train(model)
    report.assert_only_adapters_changed()
    assert report.base_changed == []
    assert [e.name for e in report.adapters_changed] == LORA


def test_accidentally_unfrozen_linear_is_changed_but_not_saved(stock):
    model = lora(make_two_linear)
    unfreeze_head(model)
    with peft_buffers.audit(model) as report:
        train(model)
    assert [(e.name, e.what) for e in report.not_saved] == [("head.weight", "parameter"), ("head.bias", "parameter")]
    assert all(e.status.startswith(NOT_SAVED) for e in report.not_saved)
    with pytest.raises(AssertionError) as raised:
        report.assert_only_adapters_changed()
    assert str(raised.value).splitlines() == [
        "training changed 2 base-model tensors besides the adapter (freeze them, or pass their names in "
        "allow=[...] if you meant to train them):",
        "  - head.weight (parameter): CHANGED BUT NOT SAVED (peft_buffers would save it: call "
        "peft_buffers.enable() before saving)",
        "  - head.bias (parameter): CHANGED BUT NOT SAVED (peft_buffers would save it: call "
        "peft_buffers.enable() before saving)",
    ]


def test_unfrozen_linear_saved_by_peft_buffers_is_still_an_offender(enabled):
    # https://github.com/huggingface/peft/issues/2099: trained direct parameters travel in the file, but a
    # parameter that changed was trainable: the assertion names it unless the user allows it.
    model = lora(make_two_linear)
    unfreeze_head(model)
    with peft_buffers.audit(model) as report:
        train(model)
    assert [(e.name, e.status) for e in report.base_changed] == [
        ("head.weight", SAVED_BY_PEFT_BUFFERS), ("head.bias", SAVED_BY_PEFT_BUFFERS)
    ]
    assert report.not_saved == []
    with pytest.raises(AssertionError, match=r"head\.weight \(parameter\): saved by peft_buffers"):
        report.assert_only_adapters_changed()
    report.assert_only_adapters_changed(allow=["head.*"])


def test_statistics_changed_with_stock_peft_are_not_saved(stock):
    # https://github.com/huggingface/peft/issues/1732
    model = lora(make_norm_net)
    with peft_buffers.audit(model) as report:
        train(model)
    assert [e.name for e in report.not_saved] == STATS
    with pytest.raises(AssertionError, match=r"bn\.running_mean \(buffer\): CHANGED BUT NOT SAVED"):
        report.assert_only_adapters_changed()


def test_a_run_that_changed_no_adapter_fails(stock):
    model = lora(make_two_linear)
    with peft_buffers.audit(model) as report:
        train(model, lr=0.0)
    assert [e.name for e in report.adapters_unchanged] == LORA
    with pytest.raises(AssertionError) as raised:
        report.assert_only_adapters_changed()
    assert str(raised.value).splitlines()[1] == (
        "  - none of the 2 trainable adapter tensors changed: was the optimizer built with the PEFT model's "
        "parameters, and did it step?"
    )


def test_big_tensors_are_compared_by_checksum_and_a_single_value_change_is_found(stock):
    model = lora(make_two_linear)
    with peft_buffers.audit(model, exact_below_bytes=0) as report:
        with torch.no_grad():
            fc1 = model.base_model.model.fc1
            getattr(fc1, "base_layer", fc1).weight[3, 5] += 1e-6  # PEFT 0.6 has no base_layer
    assert report.checksum_count == 4 and report.exact_count == 0
    assert [(e.name, e.exact, e.max_abs_diff) for e in report.base_changed] == [("fc1.weight", False, None)]


def test_names_are_relative_to_the_base_model_and_the_table_lists_them(stock):
    model = lora(make_two_linear)
    unfreeze_head(model)
    with peft_buffers.audit(model) as report:
        train(model)
    names = [e.name for e in report.entries]
    assert names == ["head.weight", "head.bias", *LORA]
    lines = str(report).splitlines()
    assert lines[0] == "peft_buffers.audit of adapter 'default' (peft_buffers NOT enabled):"
    assert lines[1].startswith("  base model: 2 of 4 tensors changed, 2 CHANGED BUT NOT SAVED")
    assert lines[2] == "  adapter: 2 of 2 trainable tensors changed"
    assert lines[3].split() == ["tensor", "part", "what", "max", "|Δ|", "status"]
    assert [line.split()[0] for line in lines[4:]] == names


def test_report_is_unusable_until_the_block_exits(stock):
    model = lora(make_two_linear)
    with peft_buffers.audit(model) as report:
        assert str(report) == "peft_buffers.audit: still running (the report is filled when the with-block exits)"
        with pytest.raises(RuntimeError, match="still running"):
            report.assert_only_adapters_changed()
