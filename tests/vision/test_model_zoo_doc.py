"""docs/model-zoo.md is the rendering of the model table (runs everywhere: the table imports without torchvision)."""

from __future__ import annotations

from .models import DOC_PATH, MODELS, render_markdown


# issue 9: the doc lists each real model and the extra state it carries
def test_model_zoo_doc_matches_the_table():
    assert DOC_PATH.read_text() == render_markdown(), "docs/model-zoo.md is stale: run `python -m tests.vision.models`"


def test_every_row_is_in_the_doc_with_its_extra_state():
    doc = DOC_PATH.read_text()
    for row in MODELS:
        line = next(line for line in doc.splitlines() if line.startswith(f"| {row.name} |"))
        assert all(kind.label in line for kind in row.state), row.name
