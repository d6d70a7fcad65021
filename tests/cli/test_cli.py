"""python -m peft_buffers: the command line (parsing, exit codes, messages), demo and inspect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version
from peft import get_peft_model
from safetensors.torch import save_file

import peft_buffers
from peft_buffers.cli import COMMANDS, main
from tests.zoo import ZOO, train, tuner_config, unfreeze_embeddings

from .._compat import PEFT_VERSION

PROG = "python -m peft_buffers"


def exit_status(argv: list[str]) -> int:
    """main's exit status, whether it returns it or argparse exits (--help, --version, a usage error)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_demo_shows_the_problem_and_the_fix(capsys):
    assert main(["demo"]) == 0
    text = capsys.readouterr().out
    stock_line = next(line for line in text.splitlines() if line.startswith("stock PEFT"))
    ours_line = next(line for line in text.splitlines() if line.startswith("peft_buffers"))
    assert float(stock_line.split()[2]) > 0.0
    assert float(ours_line.split()[1]) == 0.0
    assert "running-stat tensors in" in ours_line and stock_line.endswith("nothing")
    assert not peft_buffers.is_enabled()  # the demo leaves the patch as it found it


def test_inspect_sorts_adapter_stats_and_direct_parameters(tmp_path, capsys):
    spec = ZOO["vit"]
    peft_buffers.enable()
    try:
        model = get_peft_model(spec.make(), tuner_config("lora", spec))
        unfreeze_embeddings(model)
        train(model, spec, steps=1)
        model.save_pretrained(tmp_path, safe_serialization=True)
    finally:
        peft_buffers.disable()
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "running statistics        0 tensors" in text
    direct = [line.strip() for line in text.splitlines() if line.startswith("    base_model.model.vit")]
    position = spec.make().vit.embeddings.position_embeddings
    assert direct == [
        "base_model.model.vit.embeddings.cls_token  [1, 1, 16] F32  64 bytes",
        f"base_model.model.vit.embeddings.position_embeddings  {list(position.shape)} F32  "
        f"{position.numel() * 4:,} bytes",
    ]


def test_inspect_groups_running_statistics_by_module(tmp_path, capsys):
    spec = ZOO["mixed_norms"]
    peft_buffers.enable()
    try:
        model = get_peft_model(spec.make(), tuner_config("lora", spec))
        train(model, spec, steps=1)
        model.save_pretrained(tmp_path, safe_serialization=True)
    finally:
        peft_buffers.disable()
    assert main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    modules = [line.split()[0] for line in lines if "[running_mean" in line]
    assert modules == ["base_model.model.bn1d", "base_model.model.bn2d", "base_model.model.inorm"]  # as in the file
    assert "in 3 modules" in next(line for line in lines if "running statistics" in line)


def test_inspect_exits_1_on_an_unreadable_file(tmp_path, capsys):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["inspect", str(tmp_path)]) == 1
    assert f"cannot read {tmp_path}" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 1


def test_inspect_counts_one_module_and_one_tensor_in_the_singular(tmp_path, capsys):  # issue 12: "1 modules"
    save_file({"base_model.model.bn.running_mean": __import__("torch").zeros(4)},
              str(tmp_path / "adapter_model.safetensors"))
    assert main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  adapter tensors           0 tensors              0 bytes",
        "  running statistics        1 tensor              16 bytes in 1 module",
        "    base_model.model.bn  [running_mean]  16 bytes",
        "  changed buffers           0 tensors              0 bytes",
        "  direct parameters         0 tensors              0 bytes",
    ]


def test_module_entry_point_runs_as_a_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peft_buffers", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr == f"python -m peft_buffers inspect: error: cannot read {tmp_path}: no " \
                            f"adapter_model.safetensors or adapter_model.bin in {tmp_path}\n"


# --- issue 12: argparse subcommands, exit codes, help text ---

def test_an_unknown_option_is_a_usage_error_of_that_command(capsys):
    assert exit_status(["demo", "--bogus"]) == 2
    assert capsys.readouterr().err == (f"usage: {PROG} demo [-h]\n"
                                       f"{PROG} demo: error: unrecognized arguments: --bogus\n")
    assert exit_status(["doctor", "--jsn"]) == 2
    assert capsys.readouterr().err.endswith(f"{PROG} doctor: error: unrecognized arguments: --jsn\n")


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert exit_status([]) == 2
    assert capsys.readouterr().err.endswith(f"{PROG}: error: the following arguments are required: COMMAND\n")
    assert exit_status(["train"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_version(capsys):
    assert exit_status(["--version"]) == 0
    assert capsys.readouterr().out == f"peft_buffers {peft_buffers.__version__}\n"


def test_doctor_help_lists_every_option(capsys):
    assert exit_status(["doctor", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {PROG} doctor [-h] [--json] [--deep] [--strict]")
    options = [line.split()[0] for line in text.split("options:\n")[1].splitlines() if line.startswith("  -")]
    assert options == ["-h,", "--json", "--deep", "--strict", "--support-table", "--update-readme"]


def test_support_table_and_update_readme_exclude_each_other(capsys):
    assert exit_status(["doctor", "--support-table", "--update-readme"]) == 2
    assert capsys.readouterr().err.endswith(
        f"{PROG} doctor: error: argument --update-readme: not allowed with argument --support-table\n")


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_is_plain_text(argv, capsys):
    assert exit_status(argv) == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":data:" not in text
    if argv != ["--help"]:
        description = text.split("\n\n")[1]
        assert description[0].isupper() and not description.startswith("Python -m"), description


def test_every_command_is_listed_in_the_top_level_help(capsys):
    assert exit_status(["--help"]) == 0
    text = capsys.readouterr().out
    assert [line.split()[0] for line in text.split("  COMMAND\n")[1].split("\n\n")[0].splitlines()
            if line.startswith("    ") and not line.startswith("     ")] == list(COMMANDS)


def test_the_exit_status_reaches_the_shell():
    result = subprocess.run([sys.executable, "-m", "peft_buffers", "demo", "--bogus"], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.endswith("error: unrecognized arguments: --bogus\n")




def test_the_help_transcript_in_docs_is_current(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal width
    assert exit_status(["--help"]) == 0
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    transcript = docs.split(f"$ {PROG} --help\n", 1)[1].split("```", 1)[0]
    assert transcript == capsys.readouterr().out


def test_the_console_script_names_itself(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/peft-buffers", "demo", "--bogus"])
    assert exit_status(["demo", "--bogus"]) == 2
    assert capsys.readouterr().err == "usage: peft-buffers demo [-h]\npeft-buffers demo: error: unrecognized " \
                                      "arguments: --bogus\n"


# --- one error format for every command; inspect says what a wrong path is ---

def test_every_command_prints_its_errors_with_one_prefix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    failing = {
        "inspect": ["inspect", str(tmp_path / "missing")],
        "convert": ["convert", str(tmp_path / "missing"), "--to-peft", "0.13", "--check"],
        "doctor": ["doctor", "--update-readme"],  # no README here
        "demo": ["demo", "--bogus"],  # argparse's own usage error
    }
    for command, argv in failing.items():
        assert exit_status(argv) in (1, 2)
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith(f"{PROG} {command}: error: "), last
    assert exit_status(failing["convert"]) == 1
    assert capsys.readouterr().err == f"{PROG} convert: error: {tmp_path / 'missing'}: no such adapter folder\n"


def test_inspect_of_the_config_file_says_to_pass_the_folder_or_the_weights(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert main(["inspect", str(tmp_path / "adapter_config.json")]) == 1
    assert capsys.readouterr().err == (
        f"{PROG} inspect: error: cannot read {tmp_path / 'adapter_config.json'}: adapter_config.json is a config "
        f"file, not adapter weights: pass the adapter folder ({tmp_path}) or its adapter_model.safetensors / "
        f"adapter_model.bin\n")


def test_inspect_of_a_file_torch_cannot_load_safely_says_so_without_torchs_advice(tmp_path, capsys):
    import torch

    (tmp_path / "adapter_model.bin").write_bytes(b"garbage")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    assert main(["inspect", str(tmp_path), str(tmp_path / "list.bin"), str(tmp_path / "notes.txt")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"{PROG} inspect: error: cannot read {tmp_path}: not a weights file torch.load reads "
                               f"with weights_only=True (")
    assert lines[0].endswith("): pass the adapter folder or its adapter_model.safetensors")
    assert lines[1:] == [
        f"{PROG} inspect: error: cannot read {tmp_path / 'list.bin'}: holds a list, not a state dict of tensors",
        f"{PROG} inspect: error: cannot read {tmp_path / 'notes.txt'}: no such file or directory",
    ]
    (tmp_path / "notes.txt").write_text("x")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 1
    assert capsys.readouterr().err == (
        f"{PROG} inspect: error: cannot read {tmp_path / 'notes.txt'}: notes.txt is not an adapter weights file "
        f"(.safetensors, or .bin from torch.save): pass the adapter folder or its adapter_model.safetensors\n")


def test_convert_help_and_parser_agree_that_out_and_check_exclude_each_other(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option
    assert exit_status(["convert", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(--out DST | --check)" in text
    assert "  --out DST          new folder to write the converted copy to (or --check, not both)\n" in text
    assert "  --check            only report what would change; write nothing (instead of --out)\n" in text
    assert exit_status(["convert", str(tmp_path), "--to-peft", "0.13", "--check", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith(
        f"{PROG} convert: error: argument --out: not allowed with argument --check\n")


@pytest.mark.skipif(PEFT_VERSION < Version("0.22.0"), reason="the transcript shows files of the newest PEFT line")
def test_the_inspect_transcript_in_docs_is_current(tmp_path, monkeypatch, capsys):
    peft_buffers.enable()
    try:
        spec = ZOO["vit"]
        model = get_peft_model(spec.make(), tuner_config("lora", spec))
        unfreeze_embeddings(model)
        train(model, spec, steps=1)
        model.save_pretrained(tmp_path / "vit_adapter")
        spec = ZOO["mixed_norms"]
        model = get_peft_model(spec.make(), tuner_config("lora", spec))
        train(model, spec, steps=1)
        model.save_pretrained(tmp_path / "norms_adapter")
    finally:
        peft_buffers.disable()
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "vit_adapter", "norms_adapter"]) == 0
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    transcript = docs.split(f"$ {PROG} inspect vit_adapter norms_adapter\n", 1)[1].split("```", 1)[0]
    assert transcript == capsys.readouterr().out
    assert main(["inspect", "vit_adapter/adapter_config.json"]) == 1
    shown = docs.split(f"$ {PROG} inspect vit_adapter/adapter_config.json\n", 1)[1].split("```", 1)[0]
    assert shown == capsys.readouterr().err
