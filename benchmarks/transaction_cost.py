"""What an atomic load (issue 10) costs: snapshot + interception + commit, and a rollback, on deep models.

    PYTHONPATH=. python -m benchmarks.transaction_cost                  # 1000 x (Linear+BN) and a 64-layer Llama
    PYTHONPATH=. python -m benchmarks.transaction_cost --blocks 200 --llama-layers 8 --reps 3   # quick
    PYTHONPATH=. python -m benchmarks.transaction_cost --device cuda

Per model: the number of modules, the time of a successful ``load_adapter`` stock and inside
``run_atomically`` (median of ``--reps``), the time of an empty transaction (snapshot, shadowing every
``load_state_dict``, commit), the time of a failed load that is rolled back, and the bytes the transaction
cloned (only the tensors the load writes) next to the model's total bytes. CPU or CUDA (``--device``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_buffers.core import Transaction, atomic, run_atomically


class Deep(nn.Module):
    def __init__(self, blocks: int, width: int = 16):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width))
                                      for _ in range(blocks)])

    def forward(self, x):
        return self.layers(x)


def _llama(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _median_seconds(op, model: nn.Module, reps: int) -> float:
    """Median CPU time of ``op(copy)``, each rep on a fresh deep copy of ``model`` (the copy is not timed).

    CPU time of this process, not wall-clock: on a shared machine other processes' load would dominate.
    """
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        target = copy.deepcopy(model)
        gc.collect()  # the same heap for every rep: a full collection inside one rep is noise
        start = time.process_time()
        op(target)
        times.append(time.process_time() - start)
    return statistics.median(times[1:])


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(name: str, base: nn.Module, targets: list[str], device: str, reps: int) -> dict:
    base = base.to(device).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets)).eval()
    folder = Path(tempfile.mkdtemp()) / name
    model.save_pretrained(folder)
    broken = folder.parent / f"{name}-broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    data = (folder / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:-4])  # truncated: fails inside safetensors

    def stock_load(m):
        m.load_adapter(folder, "new")

    def atomic_load(m):
        run_atomically(m, lambda: m.load_adapter(folder, "new"))

    def empty_transaction(m):
        with atomic(m):
            pass

    def failed_load(m):
        try:
            run_atomically(m, lambda: m.load_adapter(broken, "bad"))
        except Exception:  # noqa: BLE001 - the failure is the point
            pass

    cloned = {}
    original_protect = Transaction.protect

    def counting_protect(self, tensors):
        original_protect(self, tensors)
        cloned["bytes"] = _bytes(saved for _, saved in self._saved.values())

    Transaction.protect = counting_protect
    try:
        atomic_load(copy.deepcopy(model))
    finally:
        Transaction.protect = original_protect
    return {
        "model": name,
        "modules": sum(1 for _ in model.modules()),
        "model MB": _bytes([*model.parameters(), *model.buffers()]) / 1e6,
        "cloned KB (successful load)": cloned.get("bytes", 0) / 1e3,
        "load_adapter stock CPU ms": 1e3 * _median_seconds(stock_load, model, reps),
        "load_adapter atomic CPU ms": 1e3 * _median_seconds(atomic_load, model, reps),
        "empty transaction CPU ms": 1e3 * _median_seconds(empty_transaction, model, reps),
        "failed load + rollback CPU ms": 1e3 * _median_seconds(failed_load, model, reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--llama-layers", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(f"{args.blocks}x(Linear+BN)", Deep(args.blocks), ["0.0", "1.0"], args.device, args.reps)]
    if args.llama_layers:
        rows.append(measure(f"llama-{args.llama_layers}-layers", _llama(args.llama_layers), ["q_proj", "v_proj"],
                            args.device, args.reps))
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {load[0]:.1f}, torch {torch.__version__}, device {args.device}, reps {args.reps}")
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
