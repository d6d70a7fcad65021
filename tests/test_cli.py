"""python -m peft_buffers demo / inspect."""

from __future__ import annotations

import io
import subprocess
import sys

from peft import get_peft_model

import peft_buffers
from peft_buffers.__main__ import main
from tests.zoo import ZOO, train, tuner_config, unfreeze_embeddings


def test_demo_shows_the_problem_and_the_fix():
    out = io.StringIO()
    from peft_buffers._demo import main as demo

    assert demo([], out=out) == 0
    text = out.getvalue()
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
    assert modules == ["bn1d", "bn2d", "inorm"]
    assert "in 3 modules" in next(line for line in lines if "running statistics" in line)


def test_inspect_exits_1_on_an_unreadable_file(tmp_path, capsys):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["inspect", str(tmp_path)]) == 1
    assert f"cannot read {tmp_path}" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 1


def test_module_entry_point_runs_as_a_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peft_buffers", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "no adapter_model.safetensors or adapter_model.bin" in result.stderr


