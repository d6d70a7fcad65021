"""The classified table of PEFT's adapter API is complete for the installed PEFT, and what it hooks is hooked.

Runs on every line of the compatibility matrix: a PEFT release that adds a public method to PeftModel,
PeftMixedModel, the LoRA-family tuners or peft.utils.hotswap fails here until the method is classified, so a new
release cannot add a path that changes which adapter computes without peft_buffers knowing.
"""

from __future__ import annotations

import peft_buffers
from peft_buffers.binding import patch_status
from peft_buffers.binding._api_table import HOOK_KINDS, classify, installed_api
from peft_buffers.binding.registry import entry_for

from .._compat import PEFT_VERSION


def _public_methods() -> dict[tuple[str, str], str]:
    return installed_api()


def test_every_public_method_of_the_adapter_api_is_classified():
    unclassified = sorted(f"{cls}.{name}".lstrip(".") for cls, name in _public_methods() if classify(cls, name) is None)
    assert unclassified == [], "classify these in peft_buffers/binding/_api_table.py"


def test_every_method_the_table_hooks_is_hooked_on_this_line():
    hooked = {hook.target for hook in entry_for(PEFT_VERSION).adapter_hooks}
    should = sorted(target for (cls, name), target in _public_methods().items()
                    if classify(cls, name).kind in HOOK_KINDS - {"forward"})
    assert [target for target in should if target not in hooked] == []


def test_every_hook_of_this_line_is_in_place_once_enabled():
    peft_buffers.enable()
    status = {site["site"]: site["patched"] for site in patch_status()["sites"]}
    targets = {hook.target.replace(":", ".") for hook in entry_for(PEFT_VERSION).adapter_hooks}
    assert targets <= set(status) and all(status[t] for t in targets)


def test_every_meaning_is_one_line_a_user_can_read():
    for (cls, name) in _public_methods():
        meaning = classify(cls, name).meaning
        assert meaning and "\n" not in meaning and not meaning.endswith("."), (cls, name)


def test_the_internals_page_carries_the_current_table():
    from pathlib import Path

    from peft_buffers.binding._api_table import docs_with_table

    page = (Path(__file__).resolve().parents[2] / "docs" / "internals.md").read_text(encoding="utf-8")
    assert docs_with_table(page) == page, "run `python -m peft_buffers.binding._api_table docs/internals.md`"
