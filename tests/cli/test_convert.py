"""python -m peft_buffers convert: adapter folders for an older PEFT release (issue 12).

The cross-line proof (a 0.21.2 file converted, then loaded bitwise on 0.13.2 and 0.6.2) runs in
``nox -s crossversion`` (tests/crossversion); here: exact fields, exact errors, byte-identical copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peft_buffers
from peft_buffers.binding.registry import REGISTRY, supported_range
from peft_buffers.cli import main
from peft_buffers.cli._convert import ConversionRefused, convert
from tests.crossversion.matrix import OUTPUTS, load_outputs, save

# adapter_config.json as PEFT 0.21.2 writes a LoraConfig(r=2, lora_alpha=4, target_modules=[...]).
CONFIG_0_21_2 = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 4, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 2,
    "rank_pattern": {}, "revision": None, "target_modules": ["fc2", "fc1"], "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}
# The fields PEFT 0.13 does not accept, with the first line that does (from the generated data).
UNKNOWN_TO_0_13 = {
    "alora_invocation_tokens": "0.18", "arrow_config": "0.18", "corda_config": "0.15", "ensure_weight_tying": "0.18",
    "eva_config": "0.14", "exclude_modules": "0.14", "kasa_config": "0.21", "lora_bias": "0.14",
    "lora_ga_config": "0.19", "monteclora_config": "0.20", "qalora_group_size": "0.16", "target_parameters": "0.17",
    "trainable_token_indices": "0.15", "use_bdlora": "0.19", "use_qalora": "0.16", "velora_config": "0.20",
}
UNKNOWN_TO_0_6_ONLY = {"layer_replication": "0.10", "loftq_config": "0.7", "megatron_config": "0.7",
                       "megatron_core": "0.7", "use_dora": "0.9", "use_rslora": "0.8"}


def write_adapter(folder: Path, config: dict, tensors: bytes = b"tensor bytes \x00\x01") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "adapter_model.safetensors").write_bytes(tensors)
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# issue 12: a 0.21.2 file fails on 0.13.2 with "unexpected keyword argument 'alora_invocation_tokens'"
def test_to_0_13_drops_exactly_the_unknown_default_fields_and_copies_the_rest_byte_for_byte(tmp_path):
    source = write_adapter(tmp_path / "src", CONFIG_0_21_2)
    write_adapter(source / "second", {**CONFIG_0_21_2, "r": 4}, tensors=b"second adapter")
    report = convert(source, "0.13", out=tmp_path / "out")

    dropped = {*UNKNOWN_TO_0_13, "peft_version"}
    assert {(c.config, c.name) for c in report.dropped} == {(config, name) for name in dropped
                                                            for config in ("adapter_config.json",
                                                                           "second/adapter_config.json")}
    before, after = files(source), files(tmp_path / "out")
    assert sorted(after) == sorted(before)
    for name in after:
        if name.endswith("adapter_config.json"):
            expected = {k: v for k, v in json.loads(before[name]).items() if k not in dropped}
            assert after[name].decode() == json.dumps(expected, indent=2, sort_keys=True)
        else:
            assert after[name] == before[name], name  # the tensors: byte-identical
    assert files(source) == before  # the source is left as it was


def test_to_0_6_also_drops_what_0_6_lacks(tmp_path):
    report = convert(write_adapter(tmp_path / "src", CONFIG_0_21_2), "0.6.2", check=True)
    assert {c.name for c in report.dropped} == {*UNKNOWN_TO_0_13, *UNKNOWN_TO_0_6_ONLY, "peft_version"}
    reasons = {c.name: c.reason for c in report.dropped}
    assert reasons["use_dora"] == "the default; first in PEFT 0.9"
    assert reasons["peft_version"] == "metadata, no effect on the adapter"


def test_check_reports_and_writes_nothing(tmp_path, capsys):
    source = write_adapter(tmp_path / "src", {"peft_type": "LORA", "r": 2, "use_dora": False, "lora_bias": False,
                                              "peft_version": "0.21.2"})
    before = files(tmp_path)
    assert main(["convert", str(source), "--to-peft", "0.8", "--check"]) == 0
    assert capsys.readouterr().out == (
        f"{source} -> PEFT 0.8 (fields as in 0.8.2): 1 adapter config, 3 fields dropped\n"
        "  adapter_config.json: drop lora_bias = false (the default; first in PEFT 0.14)\n"
        '  adapter_config.json: drop peft_version = "0.21.2" (metadata, no effect on the adapter)\n'
        "  adapter_config.json: drop use_dora = false (the default; first in PEFT 0.9)\n"
        "nothing written (--check)\n"
    )
    assert files(tmp_path) == before


def test_a_non_default_value_is_refused_naming_field_value_and_release(tmp_path, capsys):
    source = write_adapter(tmp_path / "src", {**CONFIG_0_21_2, "use_dora": True, "lora_bias": True})
    with pytest.raises(ConversionRefused) as refused:
        convert(source, "0.6", out=tmp_path / "out")
    assert str(refused.value) == (
        "cannot convert for PEFT 0.6 without changing the adapter (2 problems):\n"
        "- adapter_config.json: field lora_bias = true is first supported by PEFT 0.14 (default there: false); "
        "PEFT 0.6 does not know it and the adapter would compute differently without it. Load it on PEFT >= 0.14\n"
        "- adapter_config.json: field use_dora = true is first supported by PEFT 0.9 (default there: false); "
        "PEFT 0.6 does not know it and the adapter would compute differently without it. Load it on PEFT >= 0.9"
    )
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(source), "--to-peft", "0.6", "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(
        "python -m peft_buffers convert: error: cannot convert for PEFT 0.6 without changing the adapter "
        "(2 problems):\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "target", "message"), [
    ({"peft_type": "VERA"}, "0.10",
     "cannot convert for PEFT 0.10 without changing the adapter (1 problem):\n- adapter_config.json: peft_type "
     "VERA (VeraConfig) is first supported by PEFT 0.11; PEFT 0.10 has no such adapter type. Load it on PEFT >= 0.11"),
    ({"peft_type": "LORA", "my_field": 1}, "0.13",
     "cannot convert for PEFT 0.13 without changing the adapter (1 problem):\n- adapter_config.json: field my_field "
     f"= 1 is unknown to LoraConfig on every line scanned (0.6 ... {REGISTRY[-1].line}); cannot tell whether PEFT "
     "0.13 loads it the same. Remove it by hand if you know it is inert"),
])
def test_what_the_data_cannot_vouch_for_is_refused(tmp_path, config, target, message):
    with pytest.raises(ConversionRefused) as refused:
        convert(write_adapter(tmp_path / "src", config), target, check=True)
    assert str(refused.value) == message


@pytest.mark.parametrize(("target", "error", "message"), [
    ("0.5", ValueError, f"--to-peft 0.5: no registry line covers it (supported: {supported_range()}); choose a "
                        "PEFT release in that range"),
    ("latest", ValueError, "--to-peft 'latest' is not a version; expected e.g. 0.13 or 0.13.2"),
])
def test_a_target_outside_the_registry_is_refused(tmp_path, target, error, message):
    with pytest.raises(error) as raised:
        convert(write_adapter(tmp_path / "src", CONFIG_0_21_2), target, check=True)
    assert str(raised.value) == message


def test_folder_errors_name_the_folder_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="^.*empty: no adapter_config.json in it or below; expected a "
                                                "folder written by save_pretrained$"):
        convert(tmp_path / "empty", "0.13", check=True)
    source = write_adapter(tmp_path / "src", CONFIG_0_21_2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists; convert writes a new folder: choose another --out"):
        convert(source, "0.13", out=tmp_path / "taken")
    with pytest.raises(ValueError, match="is inside the source folder"):
        convert(source, "0.13", out=source / "converted")
    with pytest.raises(ValueError, match=r"needs an output folder \(out=..., --out DST\) unless check=True"):
        convert(source, "0.13")


def test_a_file_the_target_already_reads_is_copied_unchanged(tmp_path):
    source = write_adapter(tmp_path / "src", {"peft_type": "LORA", "r": 2, "use_dora": False})
    report = convert(source, "0.21", out=tmp_path / "out")
    assert report.dropped == []
    assert files(tmp_path / "out") == files(source)


# issue 12: the converted copy of a real save (two adapters, statistics, a direct parameter) still loads bitwise
def test_a_converted_real_save_loads_bitwise_with_its_extra_state(tmp_path):
    from safetensors.torch import load_file

    save(tmp_path)  # on the installed PEFT, with peft_buffers enabled
    peft_buffers.disable()
    convert(tmp_path / "adapter", "0.6", out=tmp_path / "for-0.6")
    for name in ("adapter_model.safetensors", "second/adapter_model.safetensors"):
        assert (tmp_path / "for-0.6" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    expected = load_file(tmp_path / "expected.safetensors")
    peft_buffers.enable()
    found = load_outputs(tmp_path / "for-0.6")
    assert [name for name in OUTPUTS if not torch.equal(found[name], expected[name])] == []


def test_the_command_line_shows_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["convert", "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert "usage: python -m peft_buffers convert" in usage and "--to-peft VERSION" in usage and "--check" in usage


def test_a_peft_type_the_target_dropped_is_refused(tmp_path):
    # BONE: PEFT 0.14 ... 0.18 (PEFT_TYPE_TO_CONFIG_MAPPING of 0.19 has no BONE).
    with pytest.raises(ConversionRefused) as refused:
        convert(write_adapter(tmp_path / "src", {"peft_type": "BONE"}), "0.21", check=True)
    assert str(refused.value).splitlines()[1] == (
        "- adapter_config.json: peft_type BONE (BoneConfig) is not in PEFT 0.21 (last in PEFT 0.18). Load it on "
        "PEFT <= 0.18")


def test_a_field_the_target_no_longer_has_is_dropped_at_its_last_default_or_refused(tmp_path):
    # OFTConfig.alpha_pattern: PEFT 0.7 ... 0.14 (default {}), gone from 0.15 on.
    report = convert(write_adapter(tmp_path / "a", {"peft_type": "OFT", "alpha_pattern": {}}), "0.21", check=True)
    assert [str(change) for change in report.dropped] == [
        "adapter_config.json: drop alpha_pattern = {} (the default; no longer in PEFT 0.21 (last in PEFT 0.14))"]
    with pytest.raises(ConversionRefused) as refused:
        convert(write_adapter(tmp_path / "b", {"peft_type": "OFT", "alpha_pattern": {"x": 2}}), "0.21", check=True)
    assert str(refused.value).splitlines()[1] == (
        '- adapter_config.json: field alpha_pattern = {"x": 2} is no longer in PEFT 0.21 (last in PEFT 0.14) '
        "(default there: {}); PEFT 0.21 does not know it and the adapter would compute differently without it. "
        "Load it on PEFT <= 0.14")
