"""enable()/disable(): every binding site patched, exact originals restored, idempotent, thread-safe."""

from __future__ import annotations

import importlib
import random
import threading

import pytest

import peft_buffers
from peft_buffers.binding import patch_status, versions
from peft_buffers.binding._targets import resolve_target
from peft_buffers.binding.registry import GET, SET

ENTRY, _ = versions.select_entry(versions.installed_peft_version(), allow_untested=True)


def _sites():
    for name, sites in ((GET, ENTRY.get_sites), (SET, ENTRY.set_sites)):
        for site in sites:
            yield importlib.import_module(site), name


def _hooked_methods():
    for hook in ENTRY.adapter_hooks:
        owner, attr = resolve_target(hook.target)
        yield owner, attr


def _current_objects():
    return [getattr(m, n) for m, n in _sites()] + [owner.__dict__[attr] for owner, attr in _hooked_methods()]


def test_enable_patches_every_binding_site_and_method():
    originals = _current_objects()
    peft_buffers.enable()
    patched = _current_objects()
    assert len(patched) == len(originals) > 0
    for before, after in zip(originals, patched):
        assert after is not before
        assert after.__wrapped__ is before


def test_disable_restores_the_exact_original_objects():
    originals = _current_objects()
    peft_buffers.enable()
    peft_buffers.disable()
    assert all(now is before for now, before in zip(_current_objects(), originals))
    assert not peft_buffers.is_enabled()


def test_enable_and_disable_are_idempotent():
    originals = _current_objects()
    first = peft_buffers.enable()
    wrapped = _current_objects()
    assert peft_buffers.enable() is first
    assert all(now is then for now, then in zip(_current_objects(), wrapped))  # not wrapped twice
    peft_buffers.disable()
    peft_buffers.disable()
    assert all(now is before for now, before in zip(_current_objects(), originals))


def test_concurrent_enable_disable_leaves_a_consistent_state():
    originals = _current_objects()
    errors = []

    def toggle(seed):
        rng = random.Random(seed)
        try:
            for _ in range(50):
                (peft_buffers.enable if rng.random() < 0.5 else peft_buffers.disable)()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=toggle, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    objects = _current_objects()
    if peft_buffers.is_enabled():
        assert all(now.__wrapped__ is before for now, before in zip(objects, originals))
    else:
        assert all(now is before for now, before in zip(objects, originals))
    peft_buffers.disable()
    assert all(now is before for now, before in zip(_current_objects(), originals))


def test_patch_status_lists_every_site_as_patched():
    assert patch_status() == {"enabled": False, "sites": []}
    peft_buffers.enable()
    status = patch_status()
    names = {site["site"] for site in status["sites"]}
    assert {f"{site}.{GET}" for site in ENTRY.get_sites} <= names
    assert {f"{site}.{SET}" for site in ENTRY.set_sites} <= names
    assert {hook.target.replace(":", ".") for hook in ENTRY.adapter_hooks} <= names
    assert all(site["patched"] for site in status["sites"])


def test_a_foreign_patch_is_refused_before_anything_changes(monkeypatch):
    module = importlib.import_module(ENTRY.get_sites[-1])
    monkeypatch.setattr(module, GET, lambda *a, **k: {})
    originals = _current_objects()
    with pytest.raises(peft_buffers.PeftBuffersError, match=f"{ENTRY.get_sites[-1]}.{GET} is not PEFT's original"):
        peft_buffers.enable()
    assert not peft_buffers.is_enabled()
    assert all(now is before for now, before in zip(_current_objects(), originals))
