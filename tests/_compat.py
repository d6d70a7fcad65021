"""What the installed PEFT release supports, for skips that name their reason."""

from importlib.metadata import version

import pytest
from packaging.version import Version

PEFT_VERSION = Version(version("peft"))

requires_low_cpu_mem_usage = pytest.mark.skipif(
    PEFT_VERSION < Version("0.13.0"),
    reason=f"low_cpu_mem_usage loading was added in PEFT 0.13 (installed: {PEFT_VERSION})",
)


def _save_takes_is_main_process() -> bool:
    import inspect

    from peft import PeftModel

    return "is_main_process" in inspect.signature(PeftModel.save_pretrained).parameters


requires_is_main_process = pytest.mark.skipif(
    not _save_takes_is_main_process(),
    reason=f"PeftModel.save_pretrained has no is_main_process in PEFT {PEFT_VERSION} (it writes on every process)",
)


def native_adapters_refused() -> str:
    """Why transformers' own adapter methods (``add_adapter``, ``load_adapter``) raise with the installed PEFT
    (its ``MIN_PEFT_VERSION``: transformers 5.24 wants 0.22), or "" when they work."""
    from transformers.integrations import peft as integration

    minimum = Version(getattr(integration, "MIN_PEFT_VERSION", "0"))
    if PEFT_VERSION < minimum:
        return f"transformers {version('transformers')} needs peft >= {minimum} for add_adapter"
    return ""


requires_native_adapters = pytest.mark.skipif(
    bool(native_adapters_refused()),
    reason=native_adapters_refused() + "; run `nox -s transformers_native`",
)
