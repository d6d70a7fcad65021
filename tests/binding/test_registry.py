"""The version registry: one entry per PEFT line 0.6 ... 0.22, no gap, no overlap, and true to the installed PEFT.

The tests that read the installed PEFT run on every line of the compatibility matrix (``nox -s compat``), so
each registry entry is checked against the release it names.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import peft_buffers
from peft_buffers import PeftBuffersWarning, UnsupportedPeftVersion
from peft_buffers.binding import patch_status, versions
from peft_buffers.binding._targets import resolve_target
from peft_buffers.binding.registry import (
    GET,
    REGISTRY,
    SET,
    entry_for,
    newest_entry,
    range_text,
    readme_with_table,
    support_table,
    supported_range,
)
from peft_buffers.cli._doctor import _import_every_peft_module

from .._compat import PEFT_VERSION

NEWEST_MINOR = 22
LINES = [f"0.{minor}" for minor in range(6, NEWEST_MINOR + 1)]
INSTALLED_ENTRY = entry_for(PEFT_VERSION)


def test_one_entry_per_line_from_0_6_to_the_newest():
    assert [entry.line for entry in REGISTRY] == LINES


def _releases(minor: int) -> list[Version]:
    """Every kind of version a 0.<minor> line can see: releases, post releases, pre-releases of patches."""
    found = [Version(f"0.{minor}.{patch}") for patch in range(13)]
    found += [Version(f"0.{minor}.3.post1"), Version(f"0.{minor}.4.dev0"), Version(f"0.{minor}.1rc1")]
    return found


def test_ranges_cover_0_6_0_through_the_newest_line_without_gap_or_overlap():
    for minor in range(6, NEWEST_MINOR + 1):
        for version in _releases(minor):
            covering = [entry.line for entry in REGISTRY if entry.covers(version)]
            assert covering == [f"0.{minor}"], version
    beyond = f"0.{NEWEST_MINOR + 1}"
    for outside in ("0.5.0", "0.5.9", "0.6.0.dev0", f"{beyond}.0", f"{beyond}.0.dev0", "1.0.0"):
        assert entry_for(Version(outside)) is None, outside


def test_ranges_are_contiguous():
    bounds = [range_text(entry).split(", ") for entry in REGISTRY]
    assert supported_range() == f"{bounds[0][0]}, {bounds[-1][1]}" == f">=0.6.0, <0.{NEWEST_MINOR + 1}.0"
    for (_, upper), (lower, _) in zip(bounds, bounds[1:]):
        assert upper.lstrip("<") == lower.lstrip(">=")


def test_each_entry_tests_a_release_of_its_own_line():
    for entry in REGISTRY:
        assert entry.covers(Version(entry.tested)), entry.line
        assert entry.tested.startswith(f"{entry.line}."), entry.line
    assert newest_entry() is REGISTRY[-1]


def test_signatures_keep_the_parameters_the_wrappers_bind_by_position():
    # _patch binds the model, the state dict (second parameter of set) and adapter_name by these names.
    for entry in REGISTRY:
        assert entry.get_signature[:3] == ("model", "state_dict", "adapter_name"), entry.line
        assert entry.set_signature[:3] == ("model", "peft_model_state_dict", "adapter_name"), entry.line


# --------------------------------------------------------------------------- the installed PEFT (each line)


def test_installed_peft_has_the_entrys_signatures():
    from peft.utils import save_and_load

    for name, expected in ((GET, INSTALLED_ENTRY.get_signature), (SET, INSTALLED_ENTRY.set_signature)):
        assert tuple(inspect.signature(getattr(save_and_load, name)).parameters) == expected


def test_installed_peft_binds_the_functions_exactly_at_the_entrys_sites():
    # Import every PEFT submodule, then every module holding PEFT's function objects must be listed.
    _import_every_peft_module()
    save_and_load = importlib.import_module("peft.utils.save_and_load")
    for name, listed in ((GET, INSTALLED_ENTRY.get_sites), (SET, INSTALLED_ENTRY.set_sites)):
        original = getattr(save_and_load, name)
        binding = {m for m, module in list(sys.modules.items()) if vars(module).get(name) is original}
        assert binding == set(listed), name


def test_installed_peft_defines_every_hooked_method_on_its_class():
    for hook in INSTALLED_ENTRY.adapter_hooks:
        owner, attr = resolve_target(hook.target)
        assert attr in owner.__dict__, hook.target
        if hook.kind == "forward":  # the forwarded method is the tuner's, not the PeftModel's
            assert hook.method not in owner.__dict__


def test_load_result_is_the_entrys_type(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import save_and_load

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(target_modules=["0"]))
    result = save_and_load.set_peft_model_state_dict(model, save_and_load.get_peft_model_state_dict(model))
    assert f"{type(result).__module__}.{type(result).__qualname__}" == INSTALLED_ENTRY.load_result


# ------------------------------------------------------------------------------------------ untested versions


def _next_patch(version: Version) -> Version:
    return Version(f"{version.major}.{version.minor}.{version.micro + 1}")


def test_a_newer_patch_release_of_a_listed_line_is_used_with_a_warning(monkeypatch):
    newer = _next_patch(Version(INSTALLED_ENTRY.tested))
    monkeypatch.setattr(versions, "installed_peft_version", lambda: newer)
    expected = (f"peft {newer} is newer than {INSTALLED_ENTRY.tested}, the release of the {INSTALLED_ENTRY.line}.x "
                f"line that peft_buffers was tested with; using that line's patch.")
    with pytest.warns(PeftBuffersWarning, match="^" + re.escape(expected) + "$"):
        entry = peft_buffers.enable()
    assert entry is INSTALLED_ENTRY
    assert patch_status()["untested"] is True


@pytest.mark.parametrize("outside", ["0.5.0", "0.6.0.dev0", "1.0.0", "2.3.0"])
def test_a_version_older_than_the_table_or_of_a_new_major_is_refused(monkeypatch, outside):
    monkeypatch.setattr(versions, "installed_peft_version", lambda: Version(outside))
    expected = f"peft {outside} is not supported by peft_buffers (supported: {supported_range()}, and newer "
    with pytest.raises(UnsupportedPeftVersion, match="^" + re.escape(expected)) as info:
        peft_buffers.enable()
    assert info.value.version == outside and info.value.differences == []
    assert not peft_buffers.is_enabled()


# A new PEFT release must not break every user on the day it appears: a newer minor or patch release of the
# same major is used when the newest entry's structure verifies on it, with one warning.
BEYOND = [f"0.{NEWEST_MINOR + 1}.0", f"0.{NEWEST_MINOR + 1}.0.dev0", f"0.{NEWEST_MINOR + 7}.3"]


NEWEST_ONLY = pytest.mark.skipif(INSTALLED_ENTRY is not newest_entry(),
                                 reason="the newest entry's structure is checked against the newest line's PEFT")


@NEWEST_ONLY
@pytest.mark.parametrize("newer", BEYOND)
def test_a_newer_release_with_the_newest_entrys_structure_is_used_with_one_warning(monkeypatch, newer):
    monkeypatch.setattr(versions, "installed_peft_version", lambda: Version(newer))
    newest = newest_entry()
    with pytest.warns(PeftBuffersWarning) as record:
        entry = peft_buffers.enable()
    ours = [str(w.message) for w in record if issubclass(w.category, PeftBuffersWarning)]
    assert ours == [f"peft {newer} is newer than every release peft_buffers was tested with (newest: "
                    f"{newest.tested}); its binding sites and adapter methods match the {newest.line}.x entry, so "
                    f"that entry is used. `python -m peft_buffers doctor --deep` shows what is patched."]
    assert entry is newest and patch_status()["untested"] is True
    assert all(site["patched"] for site in patch_status()["sites"])


def _changed_signature(monkeypatch, hook_kind: str) -> str:
    """Replace the hooked method of ``hook_kind`` on its class with one whose parameters differ; its target."""
    hook = next(h for h in newest_entry().adapter_hooks if h.kind == hook_kind)
    owner, attr = resolve_target(hook.target)

    def renamed(self, path, name="default", **kwargs):  # load_adapter(self, model_id, adapter_name, ...) renamed
        raise AssertionError("never called")

    monkeypatch.setattr(owner, attr, renamed)
    return hook.target


@NEWEST_ONLY
def test_a_newer_release_whose_method_signature_changed_is_refused_naming_it(monkeypatch):
    newer = Version(f"0.{NEWEST_MINOR + 1}.0")
    monkeypatch.setattr(versions, "installed_peft_version", lambda: newer)
    target = _changed_signature(monkeypatch, "load")
    originals = {name: vars(module).get(name) for name in (GET, SET) for module in [sys.modules["peft"]]}
    with pytest.raises(UnsupportedPeftVersion) as info:
        peft_buffers.enable()
    assert info.value.differences == [
        f"{target} has parameters ('self', 'path', 'name', 'kwargs'); its 'load' hook expects "
        "('self', 'model_id', 'adapter_name')"]
    assert str(info.value).startswith(f"peft {newer} is not supported by peft_buffers: it differs from the registry "
                                      f"entry it would use: {target} has parameters")
    assert not peft_buffers.is_enabled()
    assert {name: vars(sys.modules["peft"]).get(name) for name in (GET, SET)} == originals  # nothing changed


@NEWEST_ONLY
def test_a_newer_release_that_binds_the_functions_in_a_new_module_is_refused(monkeypatch):
    import types

    from peft.utils import save_and_load

    newer = Version(f"0.{NEWEST_MINOR + 1}.0")
    monkeypatch.setattr(versions, "installed_peft_version", lambda: newer)
    module = types.ModuleType("peft.tuners.made_up")
    module.get_peft_model_state_dict = save_and_load.get_peft_model_state_dict
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(UnsupportedPeftVersion) as info:
        peft_buffers.enable()
    assert info.value.differences == [
        f"peft.tuners.made_up binds {GET} but is not a binding site of the {newest_entry().line} entry"]


def test_a_patch_release_of_a_listed_line_whose_structure_changed_is_refused(monkeypatch):
    newer = _next_patch(Version(INSTALLED_ENTRY.tested))
    monkeypatch.setattr(versions, "installed_peft_version", lambda: newer)
    hook = next(h for h in INSTALLED_ENTRY.adapter_hooks if h.kind == "load")
    owner, attr = resolve_target(hook.target)
    monkeypatch.delattr(owner, attr)
    with pytest.raises(UnsupportedPeftVersion, match=re.escape(f"{hook.target} is not defined on PeftModel")):
        peft_buffers.enable()


def test_allow_untested_uses_the_newest_entry_for_a_new_major_with_a_warning():
    newest = newest_entry()
    expected = (f"peft 1.0.0 is outside every range peft_buffers was tested on; using the entry for {newest.line}.x "
                f"(tested with {newest.tested}) because allow_untested=True.")
    with pytest.warns(PeftBuffersWarning, match="^" + re.escape(expected) + "$"):
        entry, untested = versions.select_entry(Version("1.0.0"), allow_untested=True)
    assert (entry, untested) == (newest, True)


def test_the_tested_release_is_used_without_a_warning(recwarn):
    for entry in REGISTRY:
        assert versions.select_entry(Version(entry.tested)) == (entry, False)
    assert not [w for w in recwarn if issubclass(w.category, PeftBuffersWarning)]


# ------------------------------------------------------------------------------------------------- README


def test_readme_support_table_is_generated_from_the_registry():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert readme_with_table(readme) == readme, "run `python -m peft_buffers doctor --update-readme`"


def test_support_table_lists_every_line_newest_first():
    rows = support_table().splitlines()[2:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == LINES[::-1]
    assert rows[-1] == "| 0.6 | `>=0.6.0, <0.7.0` | 0.6.2 | 4.57.6 | none |"


# ------------------------------------------------------------------------------- adapter mechanics per line


# https://github.com/huggingface/peft/issues/1732: each adapter keeps its own statistics, also when deleted.
def test_deleting_the_active_adapter_forgets_its_state_on_every_line(tmp_path):
    # PeftModel.delete_adapter exists from PEFT 0.16; before, PeftModel.__getattr__ forwards it to the tuner
    # and PeftModel.active_adapter keeps naming the deleted adapter until set_adapter.
    from peft import PeftModel, get_peft_model

    from ..zoo import ZOO, logits, train, tuner_config

    spec = ZOO["mixed_norms"]
    x = spec.inputs(seed=99)
    peft_buffers.enable()
    expected = {}
    for name, seed in (("A", 1), ("B", 50)):
        trained = get_peft_model(spec.make(), tuner_config("lora", spec))
        train(trained, spec, seed=seed)
        expected[name] = logits(trained, x)
        trained.save_pretrained(tmp_path / name, safe_serialization=True)
    model = PeftModel.from_pretrained(spec.make(), tmp_path / "A", adapter_name="A").eval()
    model.load_adapter(tmp_path / "B", adapter_name="B")
    store = model.__dict__["_peft_buffers_store"]

    model.delete_adapter("A")
    model.set_adapter("B")

    assert set(store.owned) == {"B"} and set(store.stored) - {None} == {"B"}
    assert torch.equal(logits(model, x), expected["B"])
