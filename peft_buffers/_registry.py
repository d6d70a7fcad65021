"""The version registry: which patch to apply for which PEFT release line.

Everything that differs between PEFT releases lives here, as small declarative entries. The patch layer
(`_patch.py`) reads an entry and nothing else about the installed version; the core (`_state.py`) knows no
PEFT version at all.

Each entry names, for one release line:

* ``versions``: the packaging specifier the line covers (ranges must not overlap or leave gaps);
* ``tested``: the newest patch release CI runs the behaviour tests against (newer ones warn);
* ``get_signature`` / ``set_signature``: the parameter names of PEFT's ``get_peft_model_state_dict`` and
  ``set_peft_model_state_dict``; ``enable()`` checks them against the installed functions before patching;
* ``get_sites`` / ``set_sites``: every module that binds the function by name at import time, so the
  wrapper is seen by every caller;
* ``load_result``: the type ``set_peft_model_state_dict`` returns (the wrapper returns the same type);
* ``adapter_hooks``: the PEFT methods that change which adapter computes (attach on construction, switch,
  disable, delete); the wrapper calls the original and then re-syncs the per-adapter extra state;
* ``transformers``: the transformers pin CI pairs with this line on torch 2.13 CPU.

Example:
    >>> from packaging.version import Version
    >>> from peft_buffers._registry import entry_for
    >>> entry_for(Version("0.21.2")).line
    '0.21'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["AdapterHook", "PatchEntry", "REGISTRY", "entry_for", "newest_entry"]

GET = "get_peft_model_state_dict"
SET = "set_peft_model_state_dict"


@dataclass(frozen=True)
class AdapterHook:
    """One PEFT method that changes which adapter's extra state must be live.

    ``kind`` is how the wrapper behaves:

    * ``"attach"``: after the original ``__init__``, attach the extra-state store to the new model;
    * ``"sync"``: after the original returns, make the active adapter's extra state live;
    * ``"disable"``: a context manager; inside it, the base model's own values are live.
    """

    target: str  # "module.path:Class.method"
    kind: str


@dataclass(frozen=True)
class PatchEntry:
    """What the patch for one PEFT release line needs to know. See the module docstring."""

    line: str
    versions: SpecifierSet
    tested: str
    get_signature: tuple[str, ...]
    set_signature: tuple[str, ...]
    get_sites: tuple[str, ...]
    set_sites: tuple[str, ...]
    load_result: str = "torch.nn.modules.module._IncompatibleKeys"
    adapter_hooks: tuple[AdapterHook, ...] = ()
    transformers: str = "5.24.0"

    def covers(self, version: Version) -> bool:
        return self.versions.contains(version, prereleases=True)


_PEFT_MODEL_HOOKS = (
    AdapterHook("peft.peft_model:PeftModel.__init__", "attach"),
    AdapterHook("peft.peft_model:PeftModel.set_adapter", "sync"),
    AdapterHook("peft.peft_model:PeftModel.delete_adapter", "sync"),
    AdapterHook("peft.peft_model:PeftModel.disable_adapter", "disable"),
)

_GET_V07 = ("model", "state_dict", "adapter_name", "unwrap_compiled", "save_embedding_layers")
_SET_V13 = ("model", "peft_model_state_dict", "adapter_name", "ignore_mismatched_sizes", "low_cpu_mem_usage")
_SITES_BASE = ("peft", "peft.utils", "peft.utils.save_and_load", "peft.peft_model")

REGISTRY: tuple[PatchEntry, ...] = (
    PatchEntry(
        line="0.21",
        versions=SpecifierSet(">=0.21.0,<0.22.0"),
        tested="0.21.2",
        get_signature=_GET_V07,
        set_signature=_SET_V13,
        get_sites=_SITES_BASE + ("peft.functional", "peft.tuners.lora.model"),
        set_sites=_SITES_BASE + ("peft.functional", "peft.tuners.xlora.model"),
        adapter_hooks=_PEFT_MODEL_HOOKS,
    ),
)


def entry_for(version: Version) -> Optional[PatchEntry]:
    """Return the registry entry whose range covers ``version``, or None.

    Example:
        >>> from packaging.version import Version
        >>> entry_for(Version("0.5.0")) is None
        True
    """
    for entry in REGISTRY:
        if entry.covers(version):
            return entry
    return None


def newest_entry() -> PatchEntry:
    """Return the entry for the newest supported release line (used with ``allow_untested=True``).

    Example:
        >>> newest_entry().line == REGISTRY[-1].line
        True
    """
    return max(REGISTRY, key=lambda e: Version(e.tested))
