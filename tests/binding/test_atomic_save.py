"""A save either replaces the adapter folder completely or leaves it (and the model) exactly as before.

Each test saves an "old" adapter pair (``default`` in the folder, ``b`` in its subfolder), then saves a "new"
one (other weights, other statistics, another ``lora_alpha``) into the same folder while one call fails:
every write (PEFT's ``safe_save_file``, ``torch.save``, ``open``) and every ``os.replace`` and ``os.fsync``
in turn. After each failure the folder holds the same bytes and loads bitwise as the old adapters, and the
model is unchanged. A process killed between two moves leaves a folder that loads as the old or the new
adapter, or is refused by name, never a silent mix (stock PEFT loads that mix).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import sys

import peft.peft_model
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import peft_buffers
from peft_buffers import CorruptAdapterFile
from peft_buffers.core import PENDING_NAME

from .._atomic import FailAt, assert_unchanged, extra_state_of_every_adapter, model_fingerprint
from .._compat import requires_is_main_process

ADAPTERS = ("default", "second")  # not "b": PEFT < 0.22 saves every key containing the name
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def make_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def trained(seed: int, alpha: int) -> PeftModel:
    """Two adapters, each trained one step in train mode (each moves its own BatchNorm statistics)."""
    model = get_peft_model(make_base(), LoraConfig(target_modules=["0"], lora_alpha=alpha, init_lora_weights=False))
    model.add_adapter("second", LoraConfig(target_modules=["3"], lora_alpha=alpha, init_lora_weights=False))
    torch.manual_seed(seed)
    for name in ADAPTERS:
        model.set_adapter(name)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(torch.randn(16, 8) * seed).square().mean().backward()
        optimizer.step()
    model.set_adapter("default")
    return model.eval()


def outputs(model: PeftModel) -> dict[str, torch.Tensor]:
    result = {}
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            result[name] = model(X)
    model.set_adapter("default")
    return result


def loaded(folder, name: str) -> torch.Tensor:
    """What a fresh base computes with adapter ``name`` of ``folder`` loaded on its own."""
    path = folder if name == "default" else folder / name
    with torch.no_grad():
        return PeftModel.from_pretrained(make_base(), path).eval()(X)


def folder_contents(folder) -> dict[str, bytes]:
    """Every path under ``folder`` (folders too, hidden ones included) with its bytes."""
    contents = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            contents[os.path.relpath(os.path.join(root, name), folder) + "/"] = b""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                contents[os.path.relpath(path, folder)] = handle.read()
    return contents


def configs_of(model: PeftModel) -> dict:
    return {name: dict(vars(config)) for name, config in model.peft_config.items()}


def _half_safetensors(save_file, tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as handle:
        handle.truncate(os.path.getsize(filename) // 2)


def _half_torch_save(save, obj, path, *args, **kwargs):
    save(obj, path, *args, **kwargs)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


# (owner, attribute, how a failing call leaves its file, safe_serialization, failures at least)
TARGETS = {
    "safe_save_file": (peft.peft_model, "safe_save_file", _half_safetensors, True, 2),
    "torch.save": (torch, "save", _half_torch_save, False, 2),
    "open": (__import__("builtins"), "open", None, True, 3),  # two configs and the model card's copy
    "os.replace": (os, "replace", None, True, 7),  # 2 records, README.md, 2 weights files, 2 configs
    "os.fsync": (os, "fsync", None, True, 6),  # 4 files, 2 records (then the folders)
}


# https://github.com/huggingface/peft/issues/1732 (files carry state) + a save that fails midway keeps it
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_failing_write_or_rename_leaves_folder_and_model_as_before(enabled, tmp_path, monkeypatch, target):
    owner, attribute, write_half, safe, at_least = TARGETS[target]
    folder = tmp_path / "adapter"
    trained(1, alpha=4).save_pretrained(folder, safe_serialization=safe)
    before = folder_contents(folder)
    old = {name: loaded(folder, name) for name in ADAPTERS}
    model = trained(2, alpha=8)
    new = outputs(model)
    assert all(not torch.equal(old[name], new[name]) for name in ADAPTERS)

    failures = 0
    for at in itertools.count(1):
        fingerprint = model_fingerprint(model, extra_state_of_every_adapter)
        configs = configs_of(model)
        failing = FailAt(getattr(owner, attribute), at, write_half)
        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, failing)
            try:
                model.save_pretrained(folder, safe_serialization=safe)
            except OSError as error:
                assert "(injected)" in str(error)
            else:
                break
        failures += 1
        assert folder_contents(folder) == before, f"{target} call {at}"
        for name in ADAPTERS:
            assert torch.equal(loaded(folder, name), old[name]), f"{target} call {at}: adapter {name}"
        assert_unchanged(fingerprint, model, extra_state_of_every_adapter)
        assert configs_of(model) == configs, f"{target} call {at}"
    assert failures >= at_least
    for name in ADAPTERS:
        assert torch.equal(loaded(folder, name), new[name])
    assert not [path for path in folder_contents(folder) if ".peft_buffers-save-" in path or PENDING_NAME in path]


def test_stock_peft_loses_the_old_adapter_when_a_save_fails_midway(stock, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    trained(1, alpha=4).save_pretrained(folder, safe_serialization=True)
    before = folder_contents(folder)
    model = trained(2, alpha=8)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", FailAt(peft.peft_model.safe_save_file, 1,
                                                                  _half_safetensors))
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(folder, safe_serialization=True)
    monkeypatch.undo()

    assert folder_contents(folder)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises for half a file
        loaded(folder, "default")


def test_a_failed_save_restores_the_configs_peft_changed(enabled, tmp_path, monkeypatch):
    # PEFT sets inference_mode=True while it writes a config; before 0.22 an error left it set.
    model = trained(2, alpha=8)
    model.peft_config["default"].inference_mode = False
    real_dump = peft.config.PeftConfigMixin.save_pretrained

    def save_then_fail(self, *args, **kwargs):
        real_dump(self, *args, **kwargs)
        self.base_model_name_or_path = "changed while saving"
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(peft.config.PeftConfigMixin, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(tmp_path / "adapter", safe_serialization=True)

    assert model.peft_config["default"].inference_mode is False
    assert model.peft_config["default"].base_model_name_or_path is None
    assert not (tmp_path / "adapter").exists()  # the folder the save made is gone too


@requires_is_main_process
def test_is_main_process_false_writes_nothing(enabled, tmp_path):
    folder = tmp_path / "adapter"
    trained(1, alpha=4).save_pretrained(folder, safe_serialization=True)
    before = folder_contents(folder)

    trained(2, alpha=8).save_pretrained(folder, safe_serialization=True, is_main_process=False)

    assert folder_contents(folder) == before


def test_selected_adapters_replaces_only_their_folders(enabled, tmp_path):
    folder = tmp_path / "adapter"
    trained(1, alpha=4).save_pretrained(folder, safe_serialization=True)
    before = folder_contents(folder)
    old_default = loaded(folder, "default")
    model = trained(2, alpha=8)

    model.save_pretrained(folder, safe_serialization=True, selected_adapters=["second"])

    after = folder_contents(folder)
    assert {k: v for k, v in after.items() if not k.startswith("second/") and k != "README.md"} == \
        {k: v for k, v in before.items() if not k.startswith("second/") and k != "README.md"}
    assert torch.equal(loaded(folder, "default"), old_default)
    assert torch.equal(loaded(folder, "second"), outputs(model)["second"])


def test_the_model_card_keeps_its_text(enabled, tmp_path):
    folder = tmp_path / "adapter"
    trained(1, alpha=4).save_pretrained(folder, safe_serialization=True)
    card = folder / "README.md"
    card.write_text(card.read_text() + "\nNotes the user wrote.\n")

    trained(2, alpha=8).save_pretrained(folder, safe_serialization=True)

    assert "Notes the user wrote." in card.read_text()


# ---------------------------------------------------------------------------------------- a killed process

KILLED = 77


def _save_killed_at(model: PeftModel, folder, at: int) -> int:
    """Save ``model`` into ``folder`` in a child process killed (``os._exit``) just before its ``at``-th rename
    or removal of a file; the child's exit code (``KILLED``, or 0 when the save completed first)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            calls = itertools.count(1)
            real_replace, real_unlink = os.replace, os.unlink

            def die_at(function):
                def call(*args, **kwargs):
                    if next(calls) == at:
                        os._exit(KILLED)
                    return function(*args, **kwargs)
                return call

            os.replace, os.unlink = die_at(real_replace), die_at(real_unlink)
            model.save_pretrained(folder, safe_serialization=True)
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _state(folder, name: str, old: torch.Tensor, new: torch.Tensor) -> str:
    try:
        result = loaded(folder, name)
    except CorruptAdapterFile as error:
        message = str(error)
        assert PENDING_NAME in message and "adapter_model.safetensors" in message, message
        return "refused"
    if torch.equal(result, old):
        return "old"
    assert torch.equal(result, new), f"adapter {name}: neither the old nor the new adapter"
    return "new"


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork (Linux)")
def test_a_save_killed_at_any_rename_leaves_old_new_or_a_folder_refused_by_name(enabled, tmp_path):
    old_model, model = trained(1, alpha=4), trained(2, alpha=8)
    old, new = outputs(old_model), outputs(model)
    folder = tmp_path / "adapter"
    states = []
    for at in itertools.count(1):
        shutil.rmtree(folder, ignore_errors=True)
        old_model.save_pretrained(folder, safe_serialization=True)
        code = _save_killed_at(model, folder, at)
        if code == 0:
            break
        assert code == KILLED
        states.append(tuple(_state(folder, name, old[name], new[name]) for name in ADAPTERS))

    for name, column in zip(ADAPTERS, zip(*states)):
        # in order: the old adapter, then refused while its files are being replaced, then the new one
        assert column[0] == "old" and column[-1] == "new", (name, column)
        assert "refused" in column, (name, column)
        assert list(column) == sorted(column, key=["old", "refused", "new"].index), (name, column)
    # Stock PEFT loads such a folder silently: new weights and statistics with the old lora_alpha. (The first
    # refused states may still hold the old weights: files such as the base record move before them.)
    mixes = 0
    for index in (i for i, state in enumerate(states) if state[0] == "refused"):
        shutil.rmtree(folder)
        old_model.save_pretrained(folder, safe_serialization=True)
        assert _save_killed_at(model, folder, index + 1) == KILLED
        peft_buffers.disable()
        mixed = loaded(folder, "default")
        peft_buffers.enable()
        mixes += not torch.equal(mixed, old["default"]) and not torch.equal(mixed, new["default"])
    assert mixes
