"""The exact text of the warnings peft_buffers emits, for ``pytest.warns(PeftBuffersWarning, match=...)``.

pyproject.toml turns every other PeftBuffersWarning into a test failure.
"""

from __future__ import annotations

import re

CREATED_DISABLED = ("it was created while peft_buffers was not enabled (call enable() before get_peft_model / "
                    "PeftModel.from_pretrained)")


def first_seen(count: int, adapter: str = "default", seen: str = "at this save", why: str = CREATED_DISABLED,
               query: bool = False) -> str:
    """The warning of a save (or, ``query``, an ``extra_state_dict`` call) on a model peft_buffers did not attach
    to when it was created, as a regex matching exactly that text."""
    what = f"extra_state_dict(model, {adapter!r}) returns" if query else f"the file of adapter {adapter!r} carries"
    tensors = f"{count} tensor" if count == 1 else f"{count} tensors"
    return "^" + re.escape(
        f"peft_buffers first saw this model {seen}: {why}. Its base values are unknown, so {what} every running "
        f"statistic and trainable base parameter ({tensors}), changed or not.") + "$"
