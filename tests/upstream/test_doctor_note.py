"""Issue 11: ``doctor`` notes a PEFT that has its own save_running_stats / parameters_to_save (patched or a release
that merged them), and only then. Runs on every PEFT: the stock one gives no note, ``nox -s upstream`` the note."""

from __future__ import annotations

import dataclasses

import peft

from peft_buffers.binding import NATIVE_FIELDS_NOTE, peft_has_native_fields
from peft_buffers.cli._doctor import _format, doctor_report


def test_doctor_notes_native_fields_exactly_when_peft_has_them():
    has_fields = {"save_running_stats", "parameters_to_save"} <= {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert peft_has_native_fields() is has_fields
    report = doctor_report()
    assert report["native_fields"] is has_fields
    assert (NATIVE_FIELDS_NOTE in report["notes"]) is has_fields
    assert (f"note: {NATIVE_FIELDS_NOTE}" in _format(report)) is has_fields
