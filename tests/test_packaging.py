"""Declared dependencies say what the package imports and what CI tests (issue 12)."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from peft_buffers.binding.registry import REGISTRY, TESTED_TORCH, supported_range

ROOT = Path(__file__).resolve().parents[1]
# Imported only when installed: transformers (the demo, the transformers-native hooks; PEFT itself requires it
# anyway), bitsandbytes (only for a model that already holds its 4-bit weights), triton (fingerprints on CUDA in
# one kernel; CUDA builds of torch bring it).
OPTIONAL = {"transformers", "bitsandbytes", "triton"}


def install_requires() -> dict[str, Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {requirement.name: requirement for requirement in requirements}


def imported_distributions() -> set[str]:
    """Top-level modules the package imports that are neither its own nor the standard library's."""
    found = set()
    for path in (ROOT / "peft_buffers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"peft_buffers", "__future__"}


def test_every_required_distribution_is_imported_and_every_import_is_required():
    assert set(install_requires()) == imported_distributions() - OPTIONAL
    assert "accelerate" not in install_requires()  # only doctor names it, by its distribution metadata


def test_the_peft_range_starts_at_the_registry_and_has_no_upper_bound():
    peft = install_requires()["peft"].specifier
    assert str(peft) == supported_range().split(", ")[0] == ">=0.6.0"
    assert all(peft.contains(entry.tested) for entry in REGISTRY)
    # enable() refuses releases past the registry at run time, with the fix; pip must not downgrade PEFT.
    assert peft.contains(Version("0.22.0"))


def test_the_torch_ci_tests_is_allowed_and_the_floor_is_2_1():
    torch = install_requires()["torch"].specifier
    tested = re.search(r'^TORCH = "torch==([^"]+)"$', (ROOT / "noxfile.py").read_text(), re.MULTILINE).group(1)
    assert tested == TESTED_TORCH  # what doctor names as the tested torch
    assert torch.contains(tested)
    assert str(torch) == ">=2.1"
