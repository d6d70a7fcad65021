"""The stamp every result carries (machine, driver, library versions, date) and the timing helpers."""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

__all__ = ["Timer", "machine_stamp", "scratch_dir", "summarize", "sync"]


def _run(cmd: list) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_digest(package_dir: str) -> str:
    """Digest of the package's .py files: identifies the code measured even where git is absent."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(package_dir)):
        if name.endswith(".py"):
            with open(os.path.join(package_dir, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def machine_stamp(device: torch.device, argv: list) -> dict:
    """Who measured what where: GPU, driver, CUDA, library versions, date, command."""
    import peft_buffers

    stamp = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "python -m benchmarks " + " ".join(argv),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "accelerate": _version("accelerate"),
        "peft_buffers": peft_buffers.__version__,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "peft_buffers_source_sha256": _source_digest(os.path.dirname(peft_buffers.__file__)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        stamp.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=smi.split(",")[1].strip() if smi and "," in smi else None,
            nvidia_smi=smi,
        )
    return stamp


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times one call: synchronized before and after, garbage collector off during it (as ``timeit`` does).

    Use it inside ``with timer.session():``: that freezes the objects alive at its start (imports, models) so
    the collection before each call only scans what the timed calls created (milliseconds, not a quarter
    second), and collects everything at its end.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def session(self):
        gc.collect()
        gc.freeze()
        try:
            yield self
        finally:
            gc.unfreeze()
            gc.collect()

    def __call__(self, fn: Callable, *args, **kwargs):
        gc.collect()
        sync(self.device)
        enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            sync(self.device)
            elapsed = time.perf_counter() - start
        finally:
            if enabled:
                gc.enable()
        return elapsed * 1e3, result


def summarize(runs_ms: list) -> dict:
    """Median / min / max (milliseconds) and the runs themselves."""
    return {
        "median": statistics.median(runs_ms),
        "min": min(runs_ms),
        "max": max(runs_ms),
        "n": len(runs_ms),
        "runs": [round(r, 4) for r in runs_ms],
    }


@contextlib.contextmanager
def scratch_dir(min_free_gib: float):
    """A temporary folder in RAM (/dev/shm) when it has room, so disk noise stays out of save/load times."""
    import tempfile

    base = None
    if os.path.isdir("/dev/shm"):
        try:
            if shutil.disk_usage("/dev/shm").free >= min_free_gib * 2**30:
                base = "/dev/shm"
        except OSError:
            base = None
    path = tempfile.mkdtemp(prefix="peft_buffers_bench_", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
