"""Every code block of README.md and docs/*.md marked runnable runs, so none goes stale (issue 12).

The convention (CONTRIBUTING.md): a fenced block whose info string is ``python runnable``. Each block runs
in a fresh namespace, in its own temporary working directory, with the network closed and the HF hub offline.
A block checks its own claims with ``assert``; it must stay fast (tiny random-init models, a few steps).
"""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_INFO = ("python", "runnable")
# An opening or closing fence: up to 3 spaces of indent in CommonMark, more inside list items; ``` or ~~~.
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class Block(NamedTuple):
    document: Path
    line: int  # 1-based line of the first line of code
    code: str
    requires: str = ""  # e.g. "peft>=0.14": the block needs that release (info string `python runnable peft>=0.14`)

    @property
    def id(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def runnable_blocks(document: Path, text: str) -> list[Block]:
    """The fenced blocks of ``text`` whose info string is ``python runnable``, dedented to their fence.

    Example:
        >>> text = "a\\n```python runnable\\nx = 1\\n```\\n```python\\ny = 2\\n```\\n"
        >>> [(b.line, b.code) for b in runnable_blocks(ROOT / "README.md", text)]
        [(3, 'x = 1\\n')]
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        start = index + 1
        index = start
        # A closing fence: the same character, at least as long, nothing after it.
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            index += 1
        words = info.split()
        if tuple(words[:2]) == RUNNABLE_INFO and len(words) <= 3:
            code = textwrap.dedent("\n".join(lines[start:index]) + "\n")
            blocks.append(Block(document, start + 1, code, words[2] if len(words) == 3 else ""))
        index += 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in runnable_blocks(document, document.read_text("utf-8"))]


def test_the_parser_finds_exactly_the_marked_blocks():
    text = textwrap.dedent("""\
        ```python runnable
        a = 1
        ```
        ```python
        not_marked = 1
        ```
        ````markdown
        ```python runnable
        inside_another_block = 1
        ```
        ````
        - a list item:
          ```python runnable
          b = 2
          ```
        ~~~python runnable
        c = 3
        ~~~
        ```python runnable peft>=0.14
        d = 4
        ```
        """)
    blocks = runnable_blocks(ROOT / "README.md", text)
    assert [(block.line, block.code, block.requires) for block in blocks] == [
        (2, "a = 1\n", ""), (14, "b = 2\n", ""), (17, "c = 3\n", ""), (20, "d = 4\n", "peft>=0.14")]


def test_readme_and_docs_have_runnable_blocks():
    # Guards the marker itself: a renamed marker would silently turn this whole file into a no-op.
    documents = {block.document.name for block in BLOCKS}
    assert "README.md" in documents, "README.md has no ```python runnable block (see CONTRIBUTING.md)"
    assert "why-reloads-differ.md" in documents


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("a runnable documentation block must run offline (tests/test_docs.py)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def _unmet(requirement: str) -> str:
    """Why this environment cannot run a block that needs ``requirement`` (``peft>=0.14``), or ``""``."""
    if not requirement:
        return ""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    needed = Requirement(requirement)
    installed = version(needed.name)
    return "" if needed.specifier.contains(installed, prereleases=True) else f"needs {needed}, found {installed}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_runnable_block(block, tmp_path, monkeypatch, offline):
    if _unmet(block.requires):
        pytest.skip(f"{block.id} {_unmet(block.requires)}")
    monkeypatch.chdir(tmp_path)  # files a block writes land in a fresh directory
    import torch._dynamo

    torch._dynamo.reset()  # as in a fresh process: no compiled code of other tests (a block may forbid recompiles)
    namespace = {"__name__": "__main__"}
    # Padded so that a traceback names the document's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(block.document), "exec")
    exec(code, namespace)  # the project's own documentation


def test_readme_example_fails_without_peft_buffers(tmp_path, monkeypatch, offline):
    # The README's first example claims "without enable() this assert fails": stock PEFT loses the BatchNorm
    # statistics and the trained bias (PEFT #1732, #2099).
    import peft_buffers

    example = next(block for block in BLOCKS if block.document.name == "README.md")
    assert "peft_buffers.enable()" in example.code
    monkeypatch.setattr(peft_buffers, "enable", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError):
        exec(compile(example.code, example.id, "exec"), {"__name__": "__main__"})
    assert not peft_buffers.is_enabled()


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without its fenced blocks (links inside code are not links)."""
    kept, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
        elif fence is not None and match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence) \
                and not match["info"].strip():
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of ``text``: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(text), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", [*DOCUMENTS, ROOT / "CONTRIBUTING.md"],
                         ids=[str(d.relative_to(ROOT)) for d in [*DOCUMENTS, ROOT / "CONTRIBUTING.md"]])
def test_relative_links_resolve(document):
    # The README links the docs/ pages and they link each other: a moved or renamed page must not leave a dead link.
    dead = []
    for match in LINK.finditer(_prose(document.read_text("utf-8"))):
        target = match["target"]
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            dead.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text("utf-8")):
            dead.append(f"{target}: no heading with anchor #{anchor} in {linked.relative_to(ROOT)}")
    assert not dead, f"{document.relative_to(ROOT)} has dead links:\n" + "\n".join(dead)


def _exception_classes() -> dict[str, type]:
    """Every exception and warning class peft_buffers defines, by name."""
    import importlib
    import pkgutil

    import peft_buffers

    found = {}
    for module in pkgutil.walk_packages(peft_buffers.__path__, "peft_buffers."):
        if module.name.endswith("__main__"):
            continue
        for name, value in vars(importlib.import_module(module.name)).items():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__.startswith(
                    "peft_buffers"):
                found[name] = value
    return found


def test_every_exception_and_warning_the_docs_name_is_public():
    # A user catches what the README names: `except peft_buffers.CorruptAdapterFile`, `from peft_buffers import ...`.
    import peft_buffers

    classes = _exception_classes()
    named, missing = set(), []
    for document in DOCUMENTS:
        text = document.read_text("utf-8")
        for name in re.findall(r"`(?:peft_buffers\.)?([A-Z]\w+)`", text) + re.findall(r"\bpeft_buffers\.(\w+)\b(?!\.)",
                                                                                      text):
            if name in classes or name[:1].isupper():
                named.add(name)
            if name in classes and (name not in peft_buffers.__all__ or getattr(peft_buffers, name) is not
                                    classes[name]):
                missing.append(f"{document.relative_to(ROOT)}: {name}")
            elif name[:1].islower() and not hasattr(peft_buffers, name):
                missing.append(f"{document.relative_to(ROOT)}: peft_buffers.{name}")
    assert {"CorruptAdapterFile", "IncompatibleAdapterWeights", "UnsupportedPeftVersion"} <= named
    assert not missing, "named in the docs but not importable from peft_buffers:\n" + "\n".join(sorted(set(missing)))


# Pages being rewritten elsewhere; drop a name once its new page has landed.
_NOT_YET_CHECKED: set[str] = set()
_INTERNAL_NOTES = re.compile(r"\b[Ii]ssues? \d+|\bbuild machine\b|\bdevice tool\b|\bworkplace\b|\bwas lent\b|"
                             r"\bthis project's (?:build|machine)")


@pytest.mark.parametrize("document", [d for d in DOCUMENTS + [ROOT / "benchmarks" / "README.md"]
                                      if d.name not in _NOT_YET_CHECKED and d.exists()],  # an sdist has no benchmarks/
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_user_pages_carry_no_notes_about_how_the_project_is_built(document):
    # Users' pages say what the library does and how to use it; contributors' material is in CONTRIBUTING.md.
    found = [f"{document.relative_to(ROOT)}:{number}: {line.strip()}"
             for number, line in enumerate(document.read_text("utf-8").splitlines(), 1) if _INTERNAL_NOTES.search(line)]
    assert not found, "\n".join(found)
