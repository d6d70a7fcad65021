"""Cross-version matrix worker (issue 12): save on one PEFT line, load on another, compare outputs bitwise.

Run by ``tests/crossversion/test_crossversion.py`` (``nox -s crossversion``) in each line's compat venv, one
process per line and step:

    python tests/crossversion/matrix.py save DIR     # DIR/adapter (two adapters), DIR/stock, DIR/expected.safetensors
    python tests/crossversion/matrix.py load RESULT.json DIR...   # load every saved DIR here, compare

The model: BatchNorm2d and BatchNorm1d (running statistics) and a trained direct parameter (``gain``), LoRA
adapters ``default`` and ``second`` trained one after the other on different data, saved in one folder
(``second`` in its subfolder). A load that fails on this PEFT's config is retried on a copy made by
``python -m peft_buffers convert`` (its ``main``, in the same process) for this release; the cell says ``conv``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ("default", "second")
OUTPUTS = (*ADAPTERS, "disabled")
CONFIG = "adapter_config.json"


def make_base():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn2d = nn.BatchNorm2d(8)
            self.gain = nn.Parameter(torch.ones(8))  # a direct parameter, trained unfrozen (like ViT's pos_embed)
            self.fc1 = nn.Linear(8, 16)
            self.bn1d = nn.BatchNorm1d(16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            x = torch.relu(self.bn2d(self.conv(x))) * self.gain[:, None, None]
            return self.fc2(torch.relu(self.bn1d(self.fc1(x.mean(dim=(2, 3))))))

    torch.manual_seed(0)
    return Net()


def inputs(seed: int):
    import torch

    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def train(model, seed: int) -> None:
    import torch

    model.get_base_model().gain.requires_grad_(True)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        model(inputs(seed + step) * 2 + 0.5).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs(model) -> dict:
    import torch

    x = inputs(99)
    found = {}
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            found[name] = model(x)
        with model.disable_adapter():
            found["disabled"] = model(x)
    model.set_adapter(ADAPTERS[0])
    return found


def save(out: Path) -> None:
    """Train two adapters one after the other; save both; the reference outputs are the live model's."""
    import peft
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    import peft_buffers

    peft_buffers.enable()
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["fc1", "fc2"]}
    x = inputs(99)
    expected = {}
    model = get_peft_model(make_base(), LoraConfig(**config))
    # Both adapters exist before either trains: adding an adapter after the first one trained its direct
    # parameter loses that parameter from the first adapter's file on PEFT < 0.21 (reported separately).
    model.add_adapter(ADAPTERS[1], LoraConfig(**config))
    for name, seed in zip(ADAPTERS, (1, 50)):
        model.set_adapter(name)
        train(model, seed=seed)
        with torch.no_grad():  # the reference: the live model right after training this adapter
            expected[name] = model(x)
    with torch.no_grad():
        expected["disabled"] = make_base().eval()(x)  # a loaded model, adapters disabled: the fresh base
    model.save_pretrained(out / "adapter", safe_serialization=True)
    peft_buffers.disable()
    model.save_pretrained(out / "stock", safe_serialization=True)  # the control: what stock PEFT saves
    save_file({name: t.contiguous() for name, t in expected.items()}, out / "expected.safetensors")
    (out / "saved_on.txt").write_text(peft.__version__)


def load_outputs(folder: Path) -> dict:
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_base(), folder).eval()
    model.load_adapter(folder / ADAPTERS[1], adapter_name=ADAPTERS[1])
    return outputs(model)


def load(result_path: Path, saved: list[Path]) -> None:
    """Load every saved folder on this PEFT; write {saved_on: cell} and the config-data check to result_path."""
    import peft
    import torch
    from packaging.version import Version
    from safetensors.torch import load_file

    import peft_buffers
    from peft_buffers.binding.registry import entry_for
    from peft_buffers.cli._convert import main as convert_command
    from peft_buffers.cli._fieldscan import data_mismatches

    line = entry_for(Version(peft.__version__)).line
    result = {"line": line, "peft": peft.__version__, "cells": {}, "config_data": data_mismatches(line)}
    # The control: this line's model saved and loaded by stock PEFT loses the statistics and the direct parameter.
    own = next(folder for folder in saved if (folder / "saved_on.txt").read_text() == peft.__version__)
    expected = load_file(own / "expected.safetensors")
    stock = load_outputs(own / "stock")
    result["stock_differs"] = [name for name in OUTPUTS if not torch.equal(stock[name], expected[name])]
    peft_buffers.enable()
    for folder in saved:
        saved_on = (folder / "saved_on.txt").read_text()
        expected = load_file(folder / "expected.safetensors")
        cell = {"converted": False}
        try:
            try:
                found = load_outputs(folder / "adapter")
            except TypeError as error:  # an older PEFT's config class refuses a newer file's fields
                cell["raw_error"] = str(error).splitlines()[0]
                converted = Path(tempfile.mkdtemp()) / "adapter"
                # the command line, in this process: `python -m peft_buffers convert SRC --to-peft V --out DST`
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    status = convert_command([str(folder / "adapter"), "--to-peft", peft.__version__, "--out",
                                              str(converted)])
                assert status == 0, stderr.getvalue()
                cell["converted"] = True
                cell["dropped"] = sorted(json.loads((folder / "adapter" / CONFIG).read_text()).keys()
                                         - json.loads((converted / CONFIG).read_text()).keys())
                found = load_outputs(converted)
            cell["differs"] = [name for name in OUTPUTS if not torch.equal(found[name], expected[name])]
        except Exception:
            cell["error"] = traceback.format_exc(limit=3)[-1500:]
        result["cells"][saved_on] = cell
    peft_buffers.disable()
    result_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    step, *arguments = sys.argv[1:]
    if step == "save":
        save(Path(arguments[0]))
    else:
        load(Path(arguments[0]), [Path(a) for a in arguments[1:]])
