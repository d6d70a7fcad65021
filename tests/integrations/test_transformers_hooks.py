"""enable()/disable() hook transformers' PeftAdapterMixin per TRANSFORMERS_REGISTRY and restore it exactly."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from packaging.version import Version

import peft_buffers
from peft_buffers import PeftBuffersWarning
from peft_buffers.binding import patch_status
from peft_buffers.binding.registry import TRANSFORMERS_REGISTRY, transformers_entry_for

INSTALLED = Version(version("transformers"))
ENTRY = transformers_entry_for(INSTALLED)


def mixin_methods():
    """{site: the function there now} for every hooked method (PeftAdapterMixin's, PreTrainedModel.save_pretrained)."""
    from peft_buffers.binding._targets import resolve_target

    methods = {}
    for hook in ENTRY.hooks:
        owner, attr = resolve_target(hook.target)
        methods[f"{owner.__module__}.{owner.__qualname__}.{attr}"] = owner.__dict__[attr]
    return methods


@pytest.mark.skipif(ENTRY is None, reason=f"transformers {INSTALLED} is in no TRANSFORMERS_REGISTRY range")
def test_enable_wraps_each_mixin_method_and_disable_restores_the_exact_original(stock):
    originals = mixin_methods()

    peft_buffers.enable()
    try:
        patched = mixin_methods()
        status = patch_status()
    finally:
        peft_buffers.disable()

    assert all(patched[name] is not original and patched[name].__wrapped__ is original
               for name, original in originals.items())
    assert status["transformers"]["hooked"] is True
    assert set(originals) <= {site["site"] for site in status["sites"] if site["patched"]}
    assert "transformers.modeling_utils.PreTrainedModel.save_pretrained" in originals
    assert all(mixin_methods()[name] is original for name, original in originals.items())


def test_each_tested_release_falls_in_its_own_entry_alone_and_older_ones_in_none():
    assert transformers_entry_for(Version("4.56.0")) is None
    for entry in TRANSFORMERS_REGISTRY:
        assert [e for e in TRANSFORMERS_REGISTRY if e.covers(Version(entry.tested))] == [entry]


@pytest.mark.skipif(ENTRY is None, reason=f"transformers {INSTALLED} is in no TRANSFORMERS_REGISTRY range")
def test_a_changed_load_adapter_leaves_transformers_unhooked_and_peft_patched(stock, monkeypatch):
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.__dict__["load_adapter"]

    def load_adapter(self, path, name=None):  # another signature than the entry expects
        return original(self, path, name)

    monkeypatch.setattr(PeftAdapterMixin, "load_adapter", load_adapter)
    with pytest.warns(PeftBuffersWarning,
                      match="^peft_buffers: not hooking transformers-native adapters: .*load_adapter has parameters"):
        peft_buffers.enable()
    try:
        assert peft_buffers.is_enabled()
        assert patch_status()["transformers"]["hooked"] is False
        assert PeftAdapterMixin.__dict__["load_adapter"] is load_adapter
    finally:
        peft_buffers.disable()
