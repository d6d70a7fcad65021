"""``python -m benchmarks.distributed --device cuda|cpu --world-size N``: the multi-process runs of issue 13.

Launches ``worker.py`` the way users launch (``accelerate launch``, ``torchrun``), one launch per scenario, and
writes ``results.json`` + ``results.md`` (and ``log.txt``, every launch's output) to ``--out``, stamped with
machine and versions. On CUDA, NCCL; on CPU, gloo, where the path exists (SyncBatchNorm and accelerate's FSDP
plugin need GPUs: they are listed as not run, with the reason; DeepSpeed runs on its CPU accelerator). NVLink
multicast stays off (``NCCL_NVLS_ENABLE=0`` and friends are set for every launch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
REPRO = Path(__file__).with_name("accelerate_fsdp2_repro.py")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _accelerate(world: int, *flags: str) -> list:
    multi = ["--multi_gpu"] if world > 1 and not any(f.startswith("--use_") for f in flags) else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(world),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", _port(), *flags]


def _torchrun(world: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", _port()]


def _deepspeed_importable() -> tuple:
    done = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"],
                          capture_output=True, text=True)
    lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else "?"


FSDP2_FLAGS = ("--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "NO_WRAP",
               "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true")


def plan(device: str, world: int) -> list:
    """(name, command prefix, worker arguments, or the reason it is not run) for every launch."""
    gpu_only = "needs CUDA: " if device == "cpu" else None
    runs = []

    def add(name: str, prefix, args: list, skip=None, script=WORKER) -> None:
        runs.append({"name": name, "prefix": prefix, "args": args, "skip": skip, "script": script})

    add("ddp_syncbn/accelerate", _accelerate(world), ["--scenario", "ddp_syncbn", "--launcher", "accelerate"],
        gpu_only and gpu_only + "torch's SyncBatchNorm raises ValueError on CPU tensors")
    add("ddp_syncbn/torchrun", _torchrun(world), ["--scenario", "ddp_syncbn", "--launcher", "torchrun"],
        gpu_only and gpu_only + "torch's SyncBatchNorm raises ValueError on CPU tensors")
    add("ddp_bn/accelerate", _accelerate(world), ["--scenario", "ddp_bn", "--launcher", "accelerate"])
    add("ddp_bn/torchrun", _torchrun(world), ["--scenario", "ddp_bn", "--launcher", "torchrun"])
    add("fsdp2/torchrun", _torchrun(world), ["--scenario", "fsdp2", "--launcher", "torchrun"])
    add("accelerate_fsdp2_repro/torchrun", _torchrun(world), [], script=REPRO)
    note = gpu_only and gpu_only + "accelerate turns its FSDP plugin on only for GPU-like distributed types"
    add("accelerate_fsdp2/cpu_ram_efficient_loading=true (accelerate's default)",
        _accelerate(world, *FSDP2_FLAGS, "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states",
                    "true"), ["--scenario", "accelerate_fsdp2"], note)
    add("accelerate_fsdp2/cpu_ram_efficient_loading=false + get_input_embeddings workaround",
        _accelerate(world, *FSDP2_FLAGS, "--fsdp_cpu_ram_efficient_loading", "false"),
        ["--scenario", "accelerate_fsdp2", "--embeddings-workaround"], note)
    importable, version = _deepspeed_importable()
    skip = None if importable else (f"DeepSpeed not importable ({version}); it has no wheel on PyPI: build one with "
                                    "`DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed`")
    add("zero3/accelerate", _accelerate(world, "--use_deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model",
                                        "true", "--zero3_init_flag", "false", "--gradient_accumulation_steps", "1"),
        ["--scenario", "zero3"], skip)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", choices=("resnet50", "tiny"), help="default: resnet50 on cuda, tiny on cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed save/load repetitions on rank 0 per launch")
    parser.add_argument("--only", nargs="*", help="run only launches whose name starts with one of these")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    parser.add_argument("--out", help="default benchmarks/results/distributed-<device>-ws<N>")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.distributed.report import render
    from benchmarks.env import machine_stamp

    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        print(f"--world-size {args.world_size}: only {torch.cuda.device_count()} CUDA device(s)", file=sys.stderr)
        return 2
    model = args.model or ("resnet50" if args.device == "cuda" else "tiny")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"distributed-{args.device}-ws{args.world_size}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST, "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")  # DeepSpeed: gloo on CPU
    else:
        env.setdefault("DS_ACCELERATOR", "cuda")  # a wheel built on a CPU machine must not guess otherwise
    meta = machine_stamp(torch.device(args.device), ["(distributed)", *(argv or sys.argv[1:])])
    meta.update(command="python -m benchmarks.distributed " + " ".join(argv or sys.argv[1:]),
                world_size=args.world_size, model=model, gpus_visible=torch.cuda.device_count(),
                deepspeed=_deepspeed_importable()[1], nccl=".".join(map(str, torch.cuda.nccl.version()))
                if args.device == "cuda" else None, **{k: env[k] for k in NO_MULTICAST})
    results = {"meta": meta, "runs": []}
    log = open(out / "log.txt", "w")
    scratch = Path(tempfile.mkdtemp(prefix="peft_buffers_dist_"))
    started = time.perf_counter()
    try:
        for run in plan(args.device, args.world_size):
            if args.only and not any(run["name"].startswith(o) for o in args.only):
                continue
            entry = {"name": run["name"]}
            if run["skip"]:
                entry["not_run"] = run["skip"]
                results["runs"].append(entry)
                continue
            run_dir = scratch / run["name"].replace("/", "_").replace("=", "_").replace(" ", "_")
            command = [*run["prefix"], str(run["script"]), *run["args"], "--out", str(run_dir)]
            if run["script"] == WORKER:
                command += ["--model", model, "--reps", str(args.reps)]
            entry["command"] = " ".join(command).replace(sys.executable, "python")
            print(f"[{time.strftime('%H:%M:%S')}] {run['name']}", flush=True)
            t0 = time.perf_counter()
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
                rc, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as error:
                rc, output = "timeout", (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(
                    errors="replace")
            entry.update(returncode=rc, wall_s=round(time.perf_counter() - t0, 1))
            log.write(f"===== {run['name']} (rc {rc}, {entry['wall_s']} s)\n$ {entry['command']}\n{output}\n")
            log.flush()
            result = run_dir / "result.json"
            if result.exists():
                entry["result"] = json.loads(result.read_text())
            else:
                entry["error"] = output.strip().splitlines()[-25:]
            print(f"    rc {rc}, {entry['wall_s']} s", flush=True)
            results["runs"].append(entry)
            meta["elapsed_s"] = round(time.perf_counter() - started, 1)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
            (out / "results.md").write_text(render(results))  # a run cut short still leaves its tables
    finally:
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = render(results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out}/results.json, results.md, log.txt; elapsed {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
