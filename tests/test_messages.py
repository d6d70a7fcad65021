"""Errors and warnings print every key, path and value escaped, and stay short however many keys are refused.

A crafted adapter file could name a key with U+202E (right-to-left override), a NUL byte or a newline; printed
as is, the message would display something else than it says (or fake a line of its own). Every such character
is printed as its Python escape. A refusal of 100,000 keys names the first 20 and counts the rest.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_buffers import (
    CorruptAdapterFile,
    ExtraStateMismatch,
    IncompatibleAdapterWeights,
    IncompatibleExtraState,
    PeftBuffersWarning,
)
from peft_buffers._errors import escape

RLO, NUL = "\u202e", "\x00"
CRAFTED = f"base_model.model.1{RLO}gpj.exe{NUL}\nFix: nothing to see"
UNSAFE = (RLO, NUL, "\u2066", "\x85")


def make_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def saved_adapter(folder) -> None:
    get_peft_model(make_base(), LoraConfig(target_modules=["0"])).save_pretrained(folder, safe_serialization=True)


def add_keys(folder, keys) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.update({key: torch.zeros(1) for key in keys})
    save_file(tensors, path)


def assert_safe(message: str) -> None:
    """No invisible or reordering character, and no line the crafted name made up."""
    assert not [char for char in UNSAFE if char in message], repr(message)
    assert not [line for line in message.splitlines() if line.startswith("Fix: nothing to see")], repr(message)


def test_escape_writes_invisible_and_reordering_characters_as_escapes():
    assert escape(CRAFTED) == "base_model.model.1\\u202egpj.exe\\x00\\nFix: nothing to see"
    assert escape("\u2066x\u2069\x85\ud800") == "\\u2066x\\u2069\\x85\\ud800"
    assert escape("café/日本語 modèle") == "café/日本語 modèle"  # printable text is left alone
    assert escape(escape(CRAFTED)) == escape(CRAFTED)
    assert escape("k" * 1000) == "k" * 300 + "... (700 more characters)"


def test_a_crafted_key_in_a_file_is_printed_escaped(enabled, tmp_path):
    saved_adapter(tmp_path)
    add_keys(tmp_path, [CRAFTED])

    with pytest.raises(IncompatibleExtraState) as caught:
        PeftModel.from_pretrained(make_base(), tmp_path)

    message = str(caught.value)
    assert_safe(message)
    assert "- base_model.model.1\\u202egpj.exe\\x00\\nFix: nothing to see: names no module" in message
    assert caught.value.mismatches[0].key == CRAFTED  # the data keeps the real key


def test_a_crafted_key_in_a_corrupt_header_and_a_crafted_path_are_printed_escaped(enabled, tmp_path):
    folder = tmp_path / f"runs{RLO}\n{NUL[:0]}x"
    saved_adapter(folder)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])  # truncated

    with pytest.raises(CorruptAdapterFile) as caught:
        PeftModel.from_pretrained(make_base(), folder)

    assert_safe(str(caught.value))
    assert str(caught.value).startswith(f"{tmp_path}/runs\\u202e\\nx/adapter_model.safetensors: ")


def test_the_note_of_a_rolled_back_load_prints_the_path_escaped(enabled, tmp_path):
    folder = tmp_path / f"runs{RLO}x"
    saved_adapter(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = weights[key][:3]  # another rank: refused inside the load, which is rolled back
    save_file(weights, folder / "adapter_model.safetensors")
    model = get_peft_model(make_base(), LoraConfig(target_modules=["0"]))

    with pytest.raises(IncompatibleAdapterWeights) as caught:
        model.load_adapter(str(folder), "other")

    notes = "\n".join(caught.value.__notes__)
    assert_safe(notes)
    assert f"from {tmp_path}/runs\\u202ex failed; the model was rolled back" in notes


def test_a_warning_prints_module_names_escaped(enabled, tmp_path):
    base = nn.Sequential(nn.Linear(4, 8))
    base.add_module(f"bn{RLO}\n", nn.BatchNorm1d(8))
    model = get_peft_model(base, LoraConfig(target_modules=["0"]))
    with model.disable_adapter():
        model.train()(torch.randn(4, 4))  # statistics move while no adapter is live: named at save

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)

    messages = [str(w.message) for w in caught if issubclass(w.category, PeftBuffersWarning)]
    assert messages and all(RLO not in m and "\n" not in m for m in messages), messages
    assert "base_model.model.bn\\u202e\\n.running_mean" in messages[0]


@pytest.mark.parametrize("error_type", [IncompatibleExtraState, IncompatibleAdapterWeights])
def test_a_refusal_of_100000_keys_names_20_and_counts_the_rest(error_type):
    mismatches = [ExtraStateMismatch(f"base_model.model.unknown_{i}.running_mean", "names no module of the base "
                                     "model", "a module at base_model.model.unknown", "no module 'unknown'",
                                     "load the file into the model it was trained on")
                  for i in range(100_000)]

    message = str(error_type("default", mismatches))

    assert len(message) < 8_000
    assert message.count("\n- base_model.model.unknown_") == 20
    assert "unknown_19.running_mean" in message and "unknown_20.running_mean" not in message
    assert message.endswith("\n... and 99,980 more key(s)")


def test_a_file_with_more_than_20_unknown_keys_is_refused_with_a_count(enabled, tmp_path):
    saved_adapter(tmp_path)
    add_keys(tmp_path, [f"base_model.model.{i}.running_mean" for i in range(5, 35)])

    with pytest.raises(IncompatibleExtraState) as caught:
        PeftModel.from_pretrained(make_base(), tmp_path)

    assert len(caught.value.mismatches) == 30
    assert str(caught.value).count("\n- base_model.model.") == 20
    assert str(caught.value).endswith("\n... and 10 more key(s)")
