"""Adapter files move across PEFT releases (issue 12): each line's file loads bitwise on every other line.

Needs one venv per registry line: run ``nox -s crossversion``, which builds them (or reuses ``compat``'s) and
passes their interpreters in ``PEFT_BUFFERS_CROSSVERSION`` (JSON ``{line: python}``). One save process per line,
then one load process per line that loads every line's file (``matrix.py``); the table goes to the log and
to ``.nox/crossversion/matrix.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.version import Version

PYTHONS = json.loads(os.environ.get("PEFT_BUFFERS_CROSSVERSION", "{}"))
if not PYTHONS:
    pytest.skip("cross-version matrix: needs a venv per PEFT line, run `nox -s crossversion`",
                allow_module_level=True)

SCRIPT = Path(__file__).with_name("matrix.py")
ROOT = SCRIPT.parents[2]
LINES = sorted(PYTHONS, key=Version)
# Processes at a time: each is mostly interpreter start and imports, one core each (CI has 2).
JOBS = int(os.environ.get("PEFT_BUFFERS_CROSSVERSION_JOBS", "2"))


def run(line: str, *arguments: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PYTHONS[line], str(SCRIPT), *arguments], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{line} {arguments[0]}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("crossversion")
    for line in LINES:
        (work / line).mkdir()
    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(lambda line: run(line, "save", str(work / line)), LINES))
        saved = [str(work / line) for line in LINES]
        list(pool.map(lambda line: run(line, "load", str(work / f"load-{line}.json"), *saved), LINES))
    results = {line: json.loads((work / f"load-{line}.json").read_text()) for line in LINES}
    table = format_table(results)
    print("\n" + table)
    out = ROOT / ".nox" / "crossversion" / "matrix.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    return results


def cell_text(cell: dict) -> str:
    if "error" in cell:
        return "ERROR"
    if cell["differs"]:
        return "DIFF"
    return "conv" if cell["converted"] else "ok"


def format_table(results: dict) -> str:
    """Rows: saved on (tested release); columns: loaded on; ``ok`` bitwise, ``conv`` bitwise after convert."""
    saved_on = {line: results[line]["peft"] for line in LINES}
    head = "| saved on \\ loaded on | " + " | ".join(LINES) + " |"
    rows = [head, "|" + " --- |" * (len(LINES) + 1)]
    for saved in LINES:
        cells = [cell_text(results[loaded]["cells"][saved_on[saved]]) for loaded in LINES]
        rows.append(f"| {saved_on[saved]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# https://github.com/huggingface/peft/issues/1732 and /issues/2099, across releases (issue 12)
def test_every_file_loads_bitwise_on_every_line(matrix):
    bad = {(saved, loaded): cell for loaded, result in matrix.items() for saved, cell in result["cells"].items()
           if "error" in cell or cell["differs"]}
    assert not bad, "\n".join(f"saved on {saved}, loaded on {loaded}: " + (cell.get("error") or
                               f"outputs differ: {cell['differs']}") for (saved, loaded), cell in bad.items())
    assert len(next(iter(matrix.values()))["cells"]) == len(LINES)


def test_without_peft_buffers_each_line_loses_the_state(matrix):
    # The control: saved and loaded without peft_buffers on the same line, both adapters compute differently
    # from the trained model (the disabled model, the fresh base, does not).
    for line, result in matrix.items():
        assert result["stock_differs"] == ["default", "second"], line


def test_a_newer_file_is_converted_exactly_where_the_old_config_refuses_it(matrix):
    for loaded, result in matrix.items():
        for saved, cell in result["cells"].items():
            if cell["converted"]:
                assert Version(saved) > Version(result["peft"]), (saved, loaded)
                assert "unexpected keyword argument" in cell["raw_error"], cell
                assert cell["dropped"], cell
    # The cases: 0.21.2 on 0.13.2 (alora_invocation_tokens) and on 0.6.2 (also layer_replication).
    newest = max(LINES, key=Version)
    if {"0.6", "0.13"} <= set(LINES):
        newest_release = matrix[newest]["peft"]
        for old in ("0.6", "0.13"):
            cell = matrix[old]["cells"][newest_release]
            assert cell["converted"] and not cell["differs"], (old, cell)
        assert "layer_replication" in matrix["0.6"]["cells"][newest_release]["dropped"]
        assert "layer_replication" not in matrix["0.13"]["cells"][newest_release]["dropped"]


def test_the_config_field_data_matches_every_line(matrix):
    assert {line: result["config_data"] for line, result in matrix.items()} == {line: [] for line in LINES}
