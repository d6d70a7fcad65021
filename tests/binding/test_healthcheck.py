"""PEFT 0.22's ``PeftModel.healthcheck()`` carries peft_buffers' findings while it is enabled, and only then."""

from __future__ import annotations

import json

import pytest
import torch
from packaging.version import Version

from .._compat import PEFT_VERSION
from ..zoo import ZOO, tuner_config

pytestmark = pytest.mark.skipif(PEFT_VERSION < Version("0.22"), reason="PeftModel.healthcheck is new in PEFT 0.22")

def model_with_an_unfrozen_embedding():
    from peft import get_peft_model

    model = get_peft_model(ZOO["mixed_norms"].make(), tuner_config("lora", ZOO["mixed_norms"]))
    model.get_base_model().fc2.bias.requires_grad_(True)
    return model.train()


def ours(report: dict) -> list[dict]:
    return [finding for finding in report["findings"] if finding["code"].startswith("PEFT_BUFFERS_")]


def test_the_report_names_what_training_will_move_and_stays_json(enabled):
    report = model_with_an_unfrozen_embedding().healthcheck()
    json.dumps(report)  # PEFT's report is JSON-serializable; so is what peft_buffers adds
    assert report["peft_buffers"]["running_statistics_in_train_mode"] == ["bn1d", "bn2d", "inorm"]
    assert report["peft_buffers"]["trainable_base_parameters"] == ["fc2.bias"]
    assert [f["code"] for f in ours(report)] == ["PEFT_BUFFERS_RUNNING_STATS_MOVE",
                                                 "PEFT_BUFFERS_TRAINABLE_BASE_PARAMETERS"]
    assert ours(report)[0]["message"] == (
        "3 layers with running statistics in train mode (bn1d, bn2d, inorm): training moves their statistics, "
        "and peft_buffers saves them with adapter 'default'. Call .eval() on a layer to keep its statistics fixed.")


def test_a_layer_in_eval_mode_is_not_reported(enabled):
    model = model_with_an_unfrozen_embedding()
    model.get_base_model().bn1d.eval()
    assert model.healthcheck()["peft_buffers"]["running_statistics_in_train_mode"] == ["bn2d", "inorm"]


def test_changes_made_while_no_adapter_is_active_are_a_warning(enabled):
    model = model_with_an_unfrozen_embedding()
    with model.disable_adapter():
        model(ZOO["mixed_norms"].inputs())
    report = model.healthcheck()
    unsaved = [f for f in ours(report) if f["code"] == "PEFT_BUFFERS_UNSAVED_CHANGES"]
    assert len(unsaved) == 1 and unsaved[0]["severity"] == "warning"
    assert "bn1d.running_mean" in unsaved[0]["message"]


def test_print_healthcheck_shows_the_findings(enabled):
    lines = []
    model_with_an_unfrozen_embedding().print_healthcheck(sink=lines.append)
    assert "INFO: 1 base-model parameter trainable outside the adapter (fc2.bias)" in lines[0]


def test_nothing_changes_when_disabled(stock):
    model = model_with_an_unfrozen_embedding()
    report = model.healthcheck()
    assert "peft_buffers" not in report and ours(report) == []


def test_a_stock_report_and_an_enabled_report_differ_only_by_what_peft_buffers_adds(enabled):
    import peft_buffers

    torch.manual_seed(0)
    with_ours = model_with_an_unfrozen_embedding().healthcheck()
    peft_buffers.disable()
    without = model_with_an_unfrozen_embedding().healthcheck()
    with_ours.pop("peft_buffers")
    with_ours["findings"] = [f for f in with_ours["findings"] if not f["code"].startswith("PEFT_BUFFERS_")]
    assert json.dumps(with_ours, sort_keys=True) == json.dumps(without, sort_keys=True)
