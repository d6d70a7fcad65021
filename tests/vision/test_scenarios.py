"""Real models in the ways people train them: two adapters one after the other, and through ``forward_features``.

Guards issue 9: base values are known from attach, whatever entry point runs the model ("with two adapters
trained that way, adapter 'first''s file holds adapter 'second''s statistics"), and ``disable_adapter()``
computes with the base model's own values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ._stack import require_vision_stack

require_vision_stack()

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peft_buffers  # noqa: E402

from .models import EVAL_SEED, bitwise, find_row, outputs, train, unfreeze  # noqa: E402

ENTRIES = ["forward", "forward_features"]
SEQUENTIAL_ROW = find_row("timm/resnet18")


@dataclass
class TwoAdapters:
    model: torch.nn.Module  # the trained PeftModel, both adapters in it
    directory: Path  # save_pretrained of both: directory/first, directory/second
    first: torch.Tensor  # eval outputs right after training "first"
    second: torch.Tensor  # eval outputs right after training "second"


def _train_two_adapters(entry: str, directory: Path) -> TwoAdapters:
    row, x = SEQUENTIAL_ROW, SEQUENTIAL_ROW.inputs(EVAL_SEED)
    model = get_peft_model(row.build(), row.lora_config(), adapter_name="first")
    train(model, row, seed=1, entry=entry)
    first = outputs(model, x)
    model.add_adapter("second", row.lora_config())
    model.set_adapter("second")
    train(model, row, seed=11, entry=entry)
    second = outputs(model, x)
    model.save_pretrained(directory)
    return TwoAdapters(model, directory, first, second)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Per entry point: "first" trained, then "second" added and trained, with peft_buffers enabled."""
    cache: dict[str, TwoAdapters] = {}

    def get(entry: str) -> TwoAdapters:
        if entry not in cache:
            was_enabled = peft_buffers.is_enabled()
            peft_buffers.enable()
            try:
                cache[entry] = _train_two_adapters(entry, tmp_path_factory.mktemp(f"two-{entry}"))
            finally:
                (peft_buffers.enable if was_enabled else peft_buffers.disable)()
        return cache[entry]

    return get


def _assertbitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    equal, detail = bitwise(actual, expected)
    assert equal, f"{what}: {detail}"


# issue 9, rule 5: set_adapter switches each adapter's extra state, whatever entry point trained it
@pytest.mark.parametrize("entry", ENTRIES)
def test_set_adapter_switches_between_adapters_trained_one_after_the_other(enabled, two_adapters, entry):
    run, x = two_adapters(entry), SEQUENTIAL_ROW.inputs(EVAL_SEED)
    assert not torch.equal(run.first, run.second)

    run.model.set_adapter("first")
    _assertbitwise(outputs(run.model, x), run.first, "set_adapter('first')")
    run.model.set_adapter("second")
    _assertbitwise(outputs(run.model, x), run.second, "set_adapter('second')")


# issue 9: "adapter 'first''s file holds adapter 'second''s statistics"
@pytest.mark.parametrize("adapter", ["first", "second"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_each_adapter_reloads_alone(enabled, two_adapters, entry, adapter):
    run = two_adapters(entry)

    loaded = PeftModel.from_pretrained(SEQUENTIAL_ROW.build(), run.directory / adapter, adapter_name=adapter)

    _assertbitwise(outputs(loaded, SEQUENTIAL_ROW.inputs(EVAL_SEED)), getattr(run, adapter), f"reloaded {adapter!r}")


# issue 9, rule 5: both files loaded into one model, set_adapter gives each adapter's outputs
@pytest.mark.parametrize("entry", ENTRIES)
def test_both_adapters_reload_into_one_model_and_switch(enabled, two_adapters, entry):
    run, x = two_adapters(entry), SEQUENTIAL_ROW.inputs(EVAL_SEED)

    loaded = PeftModel.from_pretrained(SEQUENTIAL_ROW.build(), run.directory / "first", adapter_name="first")
    loaded.load_adapter(run.directory / "second", adapter_name="second")

    _assertbitwise(outputs(loaded, x), run.first, "'first' active after load_adapter('second')")
    loaded.set_adapter("second")
    _assertbitwise(outputs(loaded, x), run.second, "set_adapter('second')")
    loaded.set_adapter("first")
    _assertbitwise(outputs(loaded, x), run.first, "set_adapter('first') again")


# The same two-adapter run saved and loaded by stock PEFT: the first adapter's reload is another model.
def test_stock_peft_loses_the_first_adapters_state(stock, tmp_path):
    run = _train_two_adapters("forward", tmp_path)

    loaded = PeftModel.from_pretrained(SEQUENTIAL_ROW.build(), run.directory / "first", adapter_name="first")

    assert not bitwise(outputs(loaded, SEQUENTIAL_ROW.inputs(EVAL_SEED)), run.first)[0]


DISABLE_ROWS = [pytest.param(find_row(name), id=name) for name in ("timm/efficientnet_b0", "timm/vit_tiny_patch16_224")]


def _trained_single(row, entry: str) -> torch.nn.Module:
    model = get_peft_model(row.build(), row.lora_config())
    unfreeze(model.get_base_model(), row.training.unfrozen)
    train(model, row, entry=entry)
    return model


# issue 9, rule 3: base values known from attach, so disable_adapter() is the base model after any entry point
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("row", DISABLE_ROWS)
def test_disable_adapter_computes_with_the_base_model(enabled, row, entry):
    model, x = _trained_single(row, entry), row.inputs(EVAL_SEED)
    base = outputs(row.build(), x)
    assert not torch.equal(outputs(model, x), base)  # training changed the model

    with model.disable_adapter():
        _assertbitwise(outputs(model, x), base, "disable_adapter()")


# Stock PEFT: disable_adapter() still computes with the trained statistics and parameters.
@pytest.mark.parametrize("row", DISABLE_ROWS)
def test_stock_peft_disable_adapter_is_not_the_base_model(stock, row):
    model, x = _trained_single(row, "forward"), row.inputs(EVAL_SEED)

    with model.disable_adapter():
        assert not bitwise(outputs(model, x), outputs(row.build(), x))[0]


# issue 9, rule 4: a base model that training left unchanged adds nothing: the file is stock PEFT's, byte for byte
@pytest.mark.parametrize("name, norms_in_eval", [
    pytest.param("timm/convnext_atto", False, id="convnext_atto (LayerNorm only, nothing unfrozen)"),
    pytest.param("timm/resnet18", True, id="resnet18 with BatchNorm frozen in eval mode"),
])
def test_unchanged_base_model_gives_stock_bytes(enabled, tmp_path, name, norms_in_eval):
    row = find_row(name)
    model = get_peft_model(row.build(), row.lora_config())
    train(model, row, norms_in_eval=norms_in_eval)
    model.save_pretrained(tmp_path / "ours")
    peft_buffers.disable()
    model.save_pretrained(tmp_path / "stock")

    ours, stock = (tmp_path / kind / "adapter_model.safetensors" for kind in ("ours", "stock"))
    extra = sorted(set(load_file(str(ours))) - set(load_file(str(stock))))
    assert ours.read_bytes() == stock.read_bytes(), f"not stock PEFT's file; {len(extra)} extra keys: {extra[:4]}"
