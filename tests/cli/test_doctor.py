"""``python -m peft_buffers doctor``: versions, the registry entry chosen, and the binding sites it patches.

Runs on every line of the compatibility matrix, so the report is checked against each PEFT release.
"""

from __future__ import annotations

import json
import sys
import types
from importlib.metadata import version

import pytest
from packaging.version import Version

import peft_buffers
from peft_buffers.binding import patch_status, versions
from peft_buffers.binding.registry import (
    GET,
    SET,
    TESTED_TORCH,
    entry_for,
    newest_entry,
    readme_with_table,
    support_table,
    supported_range,
)
from peft_buffers.cli import _doctor, main

from .._compat import PEFT_VERSION

ENTRY = entry_for(PEFT_VERSION)
# Tests that pretend another installed pair run the installed PEFT under the newest entry: only on that line.
NEWEST_ONLY = pytest.mark.skipif(ENTRY is not newest_entry(), reason="pretends pairs of the newest line's PEFT")


def doctor(argv: list[str]) -> int:
    return main(["doctor", *argv])


def test_report_names_the_installed_line_and_every_site_patched():
    report = _doctor.doctor_report()

    assert report["versions"]["peft"] == str(PEFT_VERSION)
    assert report["entry"]["line"] == f"{PEFT_VERSION.major}.{PEFT_VERSION.minor}" == ENTRY.line
    assert report["tested_release"] is (PEFT_VERSION == Version(ENTRY.tested))
    expected_sites = {f"{site}.{GET}" for site in ENTRY.get_sites} | {f"{site}.{SET}" for site in ENTRY.set_sites}
    assert {site["site"] for site in report["sites"]} == expected_sites
    hooked = {site["site"] for site in report["hooks"]}
    assert {hook.target.replace(":", ".") for hook in ENTRY.adapter_hooks} <= hooked
    assert all(site["patched"] for site in report["sites"] + report["hooks"])
    assert report["problems"] == [] and report["unpatched"] == []


def test_report_leaves_the_patch_as_it_found_it():
    _doctor.doctor_report()
    assert not peft_buffers.is_enabled()
    peft_buffers.enable()
    before = patch_status()
    _doctor.doctor_report()
    assert patch_status() == before


def test_an_unsupported_peft_is_a_problem(monkeypatch, capsys):
    monkeypatch.setattr(versions, "installed_peft_version", lambda: Version("1.0.0.dev0"))
    report = _doctor.doctor_report()
    assert report["entry"] is None and report["sites"] == []
    assert report["problems"][0].startswith(f"peft 1.0.0.dev0 is not supported by peft_buffers (supported: "
                                            f"{supported_range()}, and newer releases")
    assert doctor([]) == 1
    assert capsys.readouterr().out.rstrip().endswith("result: problems found")


@pytest.mark.skipif(ENTRY is not newest_entry(), reason="the newest entry is checked against the newest line's PEFT")
def test_a_release_newer_than_the_table_is_reported_with_the_entry_it_uses(monkeypatch, capsys):
    newest = newest_entry()
    newer = Version(f"0.{Version(newest.tested).minor + 1}.0")
    monkeypatch.setattr(versions, "installed_peft_version", lambda: newer)
    report = _doctor.doctor_report(deep=True)
    assert report["entry"]["line"] == newest.line and report["problems"] == []
    assert (f"peft {newer} is newer than every registry line: the {newest.line}.x entry is used because its binding "
            f"sites and adapter methods match this release") in report["notes"]
    assert all(site["patched"] for site in report["sites"] + report["hooks"])
    assert doctor([]) == 0 and doctor(["--strict"]) == 1


def test_strict_fails_on_a_release_ci_does_not_test(monkeypatch):
    newer = Version(f"{PEFT_VERSION.major}.{PEFT_VERSION.minor}.{Version(ENTRY.tested).micro + 1}")
    monkeypatch.setattr(versions, "installed_peft_version", lambda: newer)
    report = _doctor.doctor_report()
    assert report["tested_release"] is False and report["problems"] == []
    assert f"CI tests the {ENTRY.line}.x line with peft {ENTRY.tested}, not {newer}" in report["notes"]
    assert doctor([]) == 0
    assert doctor(["--strict"]) == 1


def test_a_module_binding_the_original_function_unlisted_is_found(monkeypatch):
    from peft.utils import save_and_load

    stray = types.ModuleType("peft.stray_site")
    stray.get_peft_model_state_dict = save_and_load.get_peft_model_state_dict  # PEFT's original (disabled)
    monkeypatch.setitem(sys.modules, "peft.stray_site", stray)

    report = _doctor.doctor_report()

    assert report["problems"] == [f"the {ENTRY.line}.x entry does not match this peft: peft.stray_site binds {GET} "
                                  f"but is not a binding site of the {ENTRY.line} entry"]
    assert report["sites"] == []  # nothing was patched: enable() refuses such a release too


def test_a_users_module_that_imported_the_function_before_enable_is_reported_unpatched(monkeypatch):
    from peft.utils import save_and_load

    script = types.ModuleType("my_training_script")
    script.get_peft_model_state_dict = save_and_load.get_peft_model_state_dict  # imported before enable()
    monkeypatch.setitem(sys.modules, "my_training_script", script)

    report = _doctor.doctor_report()

    assert report["unpatched"] == [f"my_training_script.{GET}"]
    assert report["problems"] == [f"my_training_script.{GET} still binds PEFT's original function (imported before "
                                  f"peft_buffers.enable()): call enable() before that import"]


def test_json_output_is_the_report(capsys):
    assert doctor(["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["entry"]["line"] == ENTRY.line
    assert printed["versions"]["torch"] is not None


def test_text_output_says_whether_ci_tests_this_release(monkeypatch, capsys):
    monkeypatch.setattr(_doctor, "mixin_min_peft", lambda: None)  # whatever transformers accepts: not this test
    assert doctor([]) == 0
    out = capsys.readouterr().out
    tested = "yes" if PEFT_VERSION == Version(ENTRY.tested) else "no"
    assert f"  this exact peft release tested in CI: {tested};" in out
    assert f"  [patched] peft.utils.save_and_load.{SET}" in out
    tested_pair = PEFT_VERSION == Version(ENTRY.tested) and version("transformers") == ENTRY.transformers
    last = out.rstrip().splitlines()[-1]  # OK either way (exit 0); a newer release than CI's pair is said
    assert last == "result: OK" if tested_pair else last.startswith("result: OK; peft "), last


def test_support_table_and_readme_update(tmp_path, capsys):
    assert doctor(["--support-table"]) == 0
    assert capsys.readouterr().out == support_table() + "\n"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- support-table:start -->\nstale\n<!-- support-table:end -->\nafter\n")
    assert doctor(["--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text == readme_with_table(text) and "stale" not in text and text.endswith("end -->\nafter\n")


# issue 12: doctor tells the truth about pairs that do not work. transformers' PeftAdapterMixin refuses a PEFT
# older than its MIN_PEFT_VERSION (5.24.0 wants 0.22): the hooks are in place but the path raises.
def _add_adapter_error() -> str:
    from tests.integrations._tiny import lora_config, resnet

    try:
        resnet().add_adapter(lora_config())
    except ValueError as error:
        return str(error)
    return ""


def test_native_adapters_are_unusable_exactly_when_transformers_refuses_this_peft():
    report = _doctor.doctor_report()
    error = _add_adapter_error()

    assert bool(report["unusable"]) is bool(error), (report["unusable"], error)
    assert [path["path"] for path in report["unusable"]] == (["transformers-native adapters"] if error else [])
    assert report["problems"] == []  # PeftModel's path still works


def test_an_unusable_pair_is_reported_with_the_hooks_marked_and_a_fix(monkeypatch, capsys):
    from transformers.integrations import peft as integration

    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", "99.0.0")  # no PEFT release is accepted
    transformers = version("transformers")

    report = _doctor.doctor_report()

    assert report["unusable"] == [{
        "path": "transformers-native adapters",
        "reason": f"model.add_adapter, load_adapter, set_adapter, ... raise ValueError: transformers {transformers} "
                  f"requires peft >= 99.0.0 (its MIN_PEFT_VERSION), installed peft {PEFT_VERSION}",
        "fix": "use PEFT's PeftModel (get_peft_model, PeftModel.from_pretrained), which works with this pair",
    }]
    mixin_hooks = [hook for hook in report["hooks"]
                   if hook["site"].startswith("transformers.integrations.peft.PeftAdapterMixin.")]
    assert mixin_hooks and all(hook["usable"] is False for hook in mixin_hooks)
    assert doctor([]) == 0
    out = capsys.readouterr().out
    assert "  [patched, unusable] transformers.integrations.peft.PeftAdapterMixin.add_adapter\n" in out
    assert f"UNUSABLE: transformers-native adapters: {report['unusable'][0]['reason']}. Fix: use PEFT's " in out
    assert out.rstrip().endswith("result: OK for PeftModel; UNUSABLE with this pair: transformers-native adapters "
                                 "(fix above)")


def _pretend(monkeypatch, peft: str, transformers: str, minimum: str) -> None:
    """doctor's view of another installed pair: the versions it reads, and the transformers' MIN_PEFT_VERSION."""
    installed = _doctor._installed
    monkeypatch.setattr(versions, "installed_peft_version", lambda: Version(peft))
    monkeypatch.setattr(_doctor, "_installed", lambda name: transformers if name == "transformers"
                        else peft if name == "peft" else installed(name))
    monkeypatch.setattr(_doctor, "mixin_min_peft", lambda: Version(minimum))


# The fixes doctor offers for an UNUSABLE path are pairs CI tests (the registry's), never a transformers release
# that contradicts the note "CI pairs peft X with transformers Y" printed above it.
@NEWEST_ONLY
@pytest.mark.parametrize(("peft", "transformers", "minimum", "fix"), [
    ("0.21.2", "5.25.0", "0.22.0", "pip install peft==0.22.0 (CI tests peft 0.22.0 with transformers 5.25.0)"),
    ("0.21.2", "5.24.0", "0.22.0",  # the 0.21 line's own pair: its adapter methods refuse 0.21
     "pip install peft==0.22.0 transformers==5.25.0 (CI tests peft 0.22.0 with transformers 5.25.0)"),
    ("0.20.0", "5.25.0", "0.22.0", "pip install peft==0.22.0 (CI tests peft 0.22.0 with transformers 5.25.0)"),
])
def test_an_unusable_pair_is_fixed_by_a_pair_ci_tests(monkeypatch, capsys, peft, transformers, minimum, fix):
    _pretend(monkeypatch, peft, transformers, minimum)
    report = _doctor.doctor_report()
    assert report["unusable"][0]["fix"] == (
        f"{fix}; or use PEFT's PeftModel (get_peft_model, PeftModel.from_pretrained), which works with this pair")
    entry = entry_for(Version(peft))
    pair_note = f"CI pairs peft {entry.line}.x with transformers {entry.transformers}, not {transformers}"
    assert (pair_note in report["notes"]) is (entry.transformers != transformers)


@NEWEST_ONLY
def test_a_line_whose_pair_accepts_it_is_sent_back_to_its_pair(monkeypatch):
    newest = newest_entry()
    _pretend(monkeypatch, newest.tested, "7.0.0", "99.0.0")  # a transformers no tested PEFT satisfies
    assert _doctor.doctor_report()["unusable"][0]["fix"] == (
        f"pip install transformers=={newest.transformers} (the pair CI tests with peft {newest.line}.x); or use "
        f"PEFT's PeftModel (get_peft_model, PeftModel.from_pretrained), which works with this pair")


@NEWEST_ONLY
def test_the_last_line_reads_ok_exactly_when_the_exit_status_is_0(monkeypatch, capsys):
    newest = newest_entry()
    newer_transformers = Version(newest.transformers)
    newer_transformers = f"{newer_transformers.major}.{newer_transformers.minor + 1}.0"
    _pretend(monkeypatch, newest.tested, newer_transformers, newest.tested)  # usable, but not the tested pair
    pair = (f"peft {newest.tested} with transformers {newer_transformers} is not the pair CI tests (peft "
            f"{newest.tested} with transformers {newest.transformers})")
    assert doctor([]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"result: OK; {pair} (notes above)"
    assert doctor(["--strict"]) == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"result: FAILED (--strict): {pair}"
    assert doctor(["--strict", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["result"] == f"result: FAILED (--strict): {pair}"
    _pretend(monkeypatch, newest.tested, newest.transformers, newest.tested)  # the tested pair
    assert doctor(["--strict"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "result: OK"


def test_a_transformers_that_accepts_this_peft_is_usable(monkeypatch):
    from transformers.integrations import peft as integration

    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", str(PEFT_VERSION))
    report = _doctor.doctor_report()
    assert report["unusable"] == []
    assert all("usable" not in hook for hook in report["hooks"])


def test_update_readme_outside_the_repository_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert doctor(["--update-readme"]) == 2
    assert capsys.readouterr().err == (
        f"python -m peft_buffers doctor: error: README.md not found (in {tmp_path}): --update-readme rewrites the "
        f"README of a peft_buffers clone; run it from the repository root or pass the README's path\n")
    (tmp_path / "README.md").write_text("# another project\n")
    assert doctor(["--update-readme"]) == 2
    assert capsys.readouterr().err == (
        "python -m peft_buffers doctor: error: README.md has no <!-- support-table:start --> ... "
        "<!-- support-table:end --> markers: is it peft_buffers' README?\n")
    assert (tmp_path / "README.md").read_text() == "# another project\n"


def test_a_torch_ci_does_not_test_is_a_note(monkeypatch):  # issue 12: say what is tested
    installed = _doctor._installed
    monkeypatch.setattr(_doctor, "_installed", lambda name: "2.4.1+cu121" if name == "torch" else installed(name))
    report = _doctor.doctor_report()
    assert f"CI tests torch {TESTED_TORCH}, not 2.4.1+cu121" in report["notes"]
    monkeypatch.setattr(_doctor, "_installed", lambda name: f"{TESTED_TORCH}+cpu" if name == "torch"
                        else installed(name))
    assert not [note for note in _doctor.doctor_report()["notes"] if "torch" in note]
