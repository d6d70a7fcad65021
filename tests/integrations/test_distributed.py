"""Multi-process training on CPU (gloo), launched as users launch: accelerate DDP and torch FSDP2.

Each launch trains on different data per rank; rank 0 saves with the state dict the framework gathers and
reloads (``distributed_train.py``). Slow (two processes each): run with ``--runslow`` or ``nox -s distributed``.
Guards https://github.com/huggingface/peft/issues/1732 (statistics) and /issues/2099 (direct parameters).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("distributed_train.py")
RANKS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], out: Path, *script_args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", *launcher, str(SCRIPT), "--out", str(out), *script_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def check(result: dict) -> None:
    assert result["world_size"] == RANKS
    assert result["saved_stat_keys"] == result["base_stat_modules"] == 8
    assert result["saved_direct_parameter"]
    assert result["reload_equals_rank0"]
    assert not result["stock_reload_equals_rank0"]  # the same save without peft_buffers: the control
    # Rank 0's statistics, from rank 0's data only (DDP broadcasts rank 0's buffers before every forward;
    # FSDP leaves buffers per rank and the full state dict takes rank 0's).
    assert result["saved_stats_equal_rank"] == [True, False]


# https://github.com/huggingface/peft/issues/1732 and /issues/2099
def test_accelerate_ddp_rank0_saves_and_the_reload_equals_rank0(tmp_path):
    result = launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(RANKS),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", str(free_port())], tmp_path)
    assert result["distributed_type"] == "MULTI_CPU"
    assert result["live_equals_reference"]  # the gathered state dict is rank 0's live model
    check(result)


# https://github.com/huggingface/peft/issues/1732 and /issues/2099
def test_fsdp2_full_state_dict_carries_the_extra_state(tmp_path):
    result = launch(["torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port", str(free_port())],
                    tmp_path, "--fully-shard")
    assert result["distributed_type"] == "FSDP2 fully_shard"
    check(result)


# https://github.com/huggingface/peft/issues/1732, as the README states it for DDP (issue 13): the file holds
# rank 0's statistics (what one process emulating DDP ends with), the other ranks' differ after training, and
# DDP's next forward broadcasts rank 0's buffers to them.
def test_plain_batchnorm_under_ddp_saves_rank0_statistics_and_ddp_broadcasts_them(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.distributed", "--device", "cpu", "--world-size", str(RANKS),
               "--only", "ddp_bn/torchrun", "--reps", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [run] = json.loads((tmp_path / "results.json").read_text())["runs"]
    result = run["result"]
    assert result["world_size"] == RANKS
    assert result["saved_stat_keys"] == result["base_stat_modules"] == 8
    assert result["saved_direct_parameter"]
    assert result["reload_equals_gathered_state"] and result["reload_equals_rank0_live"]
    assert not result["stock_reload_equals_rank0"]  # the same save without peft_buffers: the control
    assert result["saved_stats_equal_rank"] == [True, False]
    assert result["stats_vs_reference"]["within_tolerance"]
    assert result["ranks_equal_after_training"] is False
    assert result["ranks_equal_after_one_more_ddp_forward"] is True
