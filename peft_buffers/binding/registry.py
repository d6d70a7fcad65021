"""The version registry: which patch to apply for which PEFT release line.

Everything that differs between PEFT releases lives here, as small declarative entries. The patch layer
(`_enable.py` and the wrappers) read an entry and nothing else about the installed version; the core (`core/`) knows no
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

The matrix ``nox -s compat`` (``noxfile.py``) reads this module on its own, without importing the package:
keep it free of torch and PEFT imports. ``python -m peft_buffers doctor --deep`` shows, for the installed
PEFT, every module that binds the functions, which is how the site lists below were found.

Example:
    >>> from packaging.version import Version
    >>> from peft_buffers.binding.registry import entry_for
    >>> entry_for(Version("0.22.0")).line
    '0.22'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ._api_table import HOOKS

__all__ = ["AdapterHook", "PatchEntry", "REGISTRY", "beyond_table", "entry_for", "newest_entry", "range_text",
           "readme_with_table", "support_table", "supported_range"]

GET = "get_peft_model_state_dict"
SET = "set_peft_model_state_dict"


@dataclass(frozen=True)
class AdapterHook:
    """One PEFT method that changes which adapter's extra state must be live.

    ``kind`` is how the wrapper behaves:

    * ``"attach"``: after the original ``__init__``, attach the extra-state store to the new model;
    * ``"sync"``: after the original returns, make the active adapter's extra state live;
    * ``"disable"``: a context manager; inside it, the base model's own values are live;
    * ``"load"``: run the original as one transaction (``_transaction.atomic``) after checking the adapter
      file's header: a load that fails for any reason leaves the model exactly as it was;
    * ``"from_pretrained"``: the same for the classmethod ``PeftModel.from_pretrained``, on the base model passed;
    * ``"structure"``: ``BaseTuner.inject_adapter`` added modules: a walk made earlier in the same load is stale;
    * ``"save"``: ``PeftModel.save_pretrained`` runs inside ``_save_folder.saving_folder``: PEFT writes into a
      staging folder, peft_buffers adds its own files, and every file is moved into place atomically;
    * ``"report"``: ``PeftModel.healthcheck`` (PEFT >= 0.22): peft_buffers' findings are added to PEFT's report;
    * ``"forward"``: ``target`` is a ``__getattr__`` that forwards ``method`` to the tuner (PEFT < 0.16 has no
      ``PeftModel.delete_adapter``); the forwarded call is wrapped like a ``"sync"`` hook on the PeftModel.
    """

    target: str  # "module.path:Class.method"
    kind: str
    method: str = ""  # for kind "forward": the forwarded attribute
    # The leading parameters the wrapper binds by name; enable() checks them on a release newer than the table.
    params: tuple[str, ...] = ("self",)


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
    adapter_hooks: tuple[AdapterHook, ...] = ()  # default: every hook of _api_table.HOOKS the line defines
    transformers: str = "5.24.0"

    def __post_init__(self) -> None:
        if not self.adapter_hooks:
            object.__setattr__(self, "adapter_hooks", _hooks_for(self.line))

    def covers(self, version: Version) -> bool:
        return self.versions.contains(version, prereleases=True)


def _hooks_for(line: str) -> tuple[AdapterHook, ...]:
    """The hooks of :data:`._api_table.HOOKS` whose methods the line defines (every release of a line has them)."""
    version = Version(f"{line}.0")
    return tuple(
        AdapterHook(h.target, h.kind, h.method, h.params)
        for h in HOOKS
        if version >= Version(f"{h.since}.0") and (not h.until or version <= Version(f"{h.until}.0"))
    )


_GET_V06 = ("model", "state_dict", "adapter_name", "unwrap_compiled")
_GET_V07 = _GET_V06 + ("save_embedding_layers",)
_SET_V06 = ("model", "peft_model_state_dict", "adapter_name")
_SET_V11 = _SET_V06 + ("ignore_mismatched_sizes",)
_SET_V13 = _SET_V11 + ("low_cpu_mem_usage",)

# Modules that bind the functions by name once `peft` and its submodules are imported (found by scanning
# sys.modules for the function objects after importing every peft submodule, on each line's tested release).
_SITES_V06 = ("peft", "peft.utils", "peft.utils.save_and_load", "peft.peft_model")
_GET_SITES_V11 = _SITES_V06 + ("peft.tuners.lora.model",)
_SET_SITES_V13 = _SITES_V06 + ("peft.tuners.xlora.model",)
_GET_SITES_V18 = _SITES_V06 + ("peft.functional", "peft.tuners.lora.model")
_SET_SITES_V18 = _SITES_V06 + ("peft.functional", "peft.tuners.xlora.model")

# The torch release every CI session installs (noxfile.py's TORCH; tests/test_packaging.py checks they agree).
TESTED_TORCH = "2.13.0"

# transformers 5.x removed `HybridCache`, which PEFT 0.16 and 0.17 import at `import peft`; transformers 5.x's
# Trainer imports `peft.PeftMixedModel`, which PEFT 0.6 lacks. Those lines are tested with the last 4.x release.
_TRANSFORMERS_4 = "4.57.6"


def _line(line: str, next_line: str) -> SpecifierSet:
    return SpecifierSet(f">={line}.0,<{next_line}.0")


REGISTRY: tuple[PatchEntry, ...] = (
    PatchEntry("0.6", _line("0.6", "0.7"), "0.6.2", _GET_V06, _SET_V06, _SITES_V06, _SITES_V06,
               transformers=_TRANSFORMERS_4),
    PatchEntry("0.7", _line("0.7", "0.8"), "0.7.1", _GET_V07, _SET_V06, _SITES_V06, _SITES_V06),
    PatchEntry("0.8", _line("0.8", "0.9"), "0.8.2", _GET_V07, _SET_V06, _SITES_V06, _SITES_V06),
    PatchEntry("0.9", _line("0.9", "0.10"), "0.9.0", _GET_V07, _SET_V06, _SITES_V06, _SITES_V06),
    PatchEntry("0.10", _line("0.10", "0.11"), "0.10.0", _GET_V07, _SET_V06, _SITES_V06, _SITES_V06),
    PatchEntry("0.11", _line("0.11", "0.12"), "0.11.1", _GET_V07, _SET_V11, _GET_SITES_V11, _SITES_V06),
    PatchEntry("0.12", _line("0.12", "0.13"), "0.12.0", _GET_V07, _SET_V11, _GET_SITES_V11, _SITES_V06),
    PatchEntry("0.13", _line("0.13", "0.14"), "0.13.2", _GET_V07, _SET_V13, _GET_SITES_V11, _SET_SITES_V13),
    PatchEntry("0.14", _line("0.14", "0.15"), "0.14.0", _GET_V07, _SET_V13, _GET_SITES_V11, _SET_SITES_V13),
    PatchEntry("0.15", _line("0.15", "0.16"), "0.15.2", _GET_V07, _SET_V13, _GET_SITES_V11, _SET_SITES_V13),
    PatchEntry("0.16", _line("0.16", "0.17"), "0.16.0", _GET_V07, _SET_V13, _GET_SITES_V11, _SET_SITES_V13,
               transformers=_TRANSFORMERS_4),
    PatchEntry("0.17", _line("0.17", "0.18"), "0.17.1", _GET_V07, _SET_V13, _GET_SITES_V11, _SET_SITES_V13,
               transformers=_TRANSFORMERS_4),
    PatchEntry("0.18", _line("0.18", "0.19"), "0.18.1", _GET_V07, _SET_V13, _GET_SITES_V18, _SET_SITES_V18),
    PatchEntry("0.19", _line("0.19", "0.20"), "0.19.1", _GET_V07, _SET_V13, _GET_SITES_V18, _SET_SITES_V18),
    PatchEntry("0.20", _line("0.20", "0.21"), "0.20.0", _GET_V07, _SET_V13, _GET_SITES_V18, _SET_SITES_V18),
    PatchEntry("0.21", _line("0.21", "0.22"), "0.21.2", _GET_V07, _SET_V13, _GET_SITES_V18, _SET_SITES_V18),
    # 0.22 (from the 0.21.2 -> 0.22.0 diff of save_and_load, peft_model, mixed_model, tuners_utils, hotswap):
    # - the functions keep 0.21's signatures and binding sites; the adapter hooks are the same methods.
    # - get_peft_model_state_dict filters other adapters' keys by tuner prefix (an adapter named like a module
    #   path segment no longer truncates the file) and gathers DTensors of the *selected* entries only: the
    #   extra state the wrapper adds comes from the live model or the caller's state_dict, as before.
    # - set_peft_model_state_dict(low_cpu_mem_usage=True) puts back the dtype/device of real tensors it assigns
    #   (modules_to_save, embeddings); the wrapper passes extra state around it, so nothing changes for us.
    # - load_adapter warns (strict_adapter_check="warn") on missing *and unexpected* adapter keys, and
    #   from_pretrained no longer filters missing keys itself; the wrapper removes its own keys from both.
    # - save_pretrained restores peft_config.inference_mode when writing the config fails (try/finally).
    # - new public PeftModel.merge_adapter / unmerge_adapter (reshard FSDP2 first), healthcheck /
    #   print_healthcheck (peft_buffers adds its findings), set_adapter refuses a list and unmerges first.
    # - PeftMixedModel.disable_adapter re-enables only layers that were enabled; load_adapter keeps
    #   requires_grad of existing parameters across its set_adapter.
    # - hotswap: adapter keys found by tuner prefix, Conv dilation/padding_mode, config checked against the
    #   adapter being replaced (not the active one).
    PatchEntry("0.22", _line("0.22", "0.23"), "0.22.0", _GET_V07, _SET_V13, _GET_SITES_V18, _SET_SITES_V18,
               transformers="5.25.0"),
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


def beyond_table(version: Version) -> bool:
    """True for a release newer than every line in the table but of the newest line's major version.

    Such a release (a new minor or patch, or PEFT main's next dev version) is used with the newest entry when that
    entry's structure verifies on it at ``enable()`` time; a new major version is refused.

    Example:
        >>> from packaging.version import Version
        >>> beyond_table(Version("0.99.0")), beyond_table(Version("1.0.0")), beyond_table(Version("0.5.0"))
        (True, False, False)
    """
    newest = newest_entry()
    upper = Version(range_text(newest).split(", ")[-1].lstrip("<"))
    return Version(version.base_version) >= upper and version.major == upper.major  # 0.23.0.dev0 included


README_START = "<!-- support-table:start -->"
README_END = "<!-- support-table:end -->"


def range_text(entry: PatchEntry) -> str:
    """The entry's version range, lower bound first.

    Example:
        >>> range_text(REGISTRY[0])
        '>=0.6.0, <0.7.0'
    """
    return ", ".join(sorted((str(s) for s in entry.versions), key=lambda s: not s.startswith(">")))


def supported_range() -> str:
    """The PEFT versions the whole registry covers (its ranges are contiguous).

    Example:
        >>> supported_range()
        '>=0.6.0, <0.23.0'
    """
    lowest = min(REGISTRY, key=lambda e: Version(e.tested))
    highest = newest_entry()
    return f"{range_text(lowest).split(', ')[0]}, {range_text(highest).split(', ')[-1]}"


def support_table() -> str:
    """The README's support table, generated from :data:`REGISTRY` (newest line first).

    Example:
        >>> support_table().splitlines()[2].startswith("| 0.22 |")
        True
    """
    rows = [
        "| PEFT line | Versions | Tested in CI | with transformers | Load options passed through |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in sorted(REGISTRY, key=lambda e: Version(e.tested), reverse=True):
        options = ", ".join(f"`{name}`" for name in entry.set_signature[3:]) or "none"
        rows.append(f"| {entry.line} | `{range_text(entry)}` | {entry.tested} | {entry.transformers} | {options} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the support-table markers replaced by :func:`support_table`.

    Example:
        >>> readme_with_table(f"x\\n{README_START}\\nold\\n{README_END}\\n").count("| 0.6 |")
        1
    """
    head, start, rest = readme.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"README has no {README_START} ... {README_END} markers")
    note = "<!-- generated from peft_buffers/binding/registry.py by `python -m peft_buffers doctor --update-readme` -->"
    return f"{head}{start}\n{note}\n{support_table()}\n{end}{tail}"


# ------------------------------------------------------------------ transformers-native adapters (issue 6)
# transformers' `PeftAdapterMixin` attaches adapters to a transformers model without a PeftModel
# (`model.add_adapter`, `load_adapter`, `set_adapter`, ...). Saving goes through get_peft_model_state_dict,
# patched above; these entries say which mixin methods to hook so loading and switching keep each adapter's
# extra state. Hook kinds (implemented in `peft_buffers/binding/_transformers.py`):
#
# * ``"attach"``: after the original (``add_adapter``), attach the extra-state store, make the active adapter's
#   state live;
# * ``"switch"``: after the original (``set_adapter``, ``enable_adapters``, ``disable_adapters``), make the
#   extra state of the adapter that computes now live (the base model's own while adapters are disabled);
# * ``"delete"``: after the original (``delete_adapter``), switch as above and forget deleted adapters' state;
# * ``"save"``: ``PreTrainedModel.save_pretrained`` of a model with adapters (``_hf_peft_config_loaded``) runs
#   inside ``_save_folder.saving_folder`` (atomic, like PEFT's own save); other models save as they always do;
# * ``"load"``: transformers 5.x ``load_adapter`` loads the file through its own weight loader and never calls
#   set_peft_model_state_dict: validate the file's extra state first, then keep what the loader wrote into the
#   live tensors as the loaded adapter's own values (live only when that adapter is active);
# * ``"validate"``: transformers 4.x ``load_adapter`` loads through set_peft_model_state_dict (patched above),
#   but only after injecting the adapter: validate the file's extra state before the original runs, so a bad
#   file leaves the model untouched.


@dataclass(frozen=True)
class TransformersEntry:
    """The ``PeftAdapterMixin`` hooks for one transformers release range (``tested``: the release CI runs).

    ``load_signature``: the leading parameters of ``load_adapter`` the load hook expects; checked at ``enable()``.
    ``tested_min_peft``: the ``MIN_PEFT_VERSION`` of the ``tested`` release (its mixin refuses older PEFT). doctor
    reads the installed release's own constant; this one only picks the transformers release to suggest.

    Example:
        >>> from packaging.version import Version
        >>> transformers_entry_for(Version("5.23.0")).tested
        '5.23.0'
    """

    versions: SpecifierSet
    tested: str
    hooks: tuple[AdapterHook, ...]
    load_signature: tuple[str, ...] = ()
    tested_min_peft: Optional[str] = None

    def covers(self, version: Version) -> bool:
        return self.versions.contains(version, prereleases=True)


_MIXIN = "transformers.integrations.peft:PeftAdapterMixin"
_MIXIN_HOOKS = (
    AdapterHook(f"{_MIXIN}.add_adapter", "attach"),
    AdapterHook(f"{_MIXIN}.set_adapter", "switch"),
    AdapterHook(f"{_MIXIN}.enable_adapters", "switch"),
    AdapterHook(f"{_MIXIN}.disable_adapters", "switch"),
    AdapterHook(f"{_MIXIN}.delete_adapter", "delete"),
    # a model with adapters saves only them, in PEFT's format: atomically, as PeftModel.save_pretrained
    AdapterHook("transformers.modeling_utils:PreTrainedModel.save_pretrained", "save",
                params=("self", "save_directory", "is_main_process")),
)
_LOAD_V4 = ("self", "peft_model_id", "adapter_name", "revision", "token")
_LOAD_V5 = ("self", "peft_model_id", "adapter_name", "peft_config", "adapter_state_dict", "low_cpu_mem_usage",
            "is_trainable", "hotswap", "local_files_only", "adapter_kwargs", "load_config")

TRANSFORMERS_REGISTRY: tuple[TransformersEntry, ...] = (
    TransformersEntry(SpecifierSet(">=4.57.0,<5.0.0"), "4.57.6",
                      _MIXIN_HOOKS + (AdapterHook(f"{_MIXIN}.load_adapter", "validate"),), _LOAD_V4, "0.5.0"),
    TransformersEntry(SpecifierSet(">=5.0.0,<5.24.0"), "5.23.0",
                      _MIXIN_HOOKS + (AdapterHook(f"{_MIXIN}.load_adapter", "load"),), _LOAD_V5, "0.20.0"),
    # 5.24 raised MIN_PEFT_VERSION to 0.22: the same hooks, tested with PEFT 0.22.0.
    TransformersEntry(SpecifierSet(">=5.24.0,<6.0.0"), "5.25.0",
                      _MIXIN_HOOKS + (AdapterHook(f"{_MIXIN}.load_adapter", "load"),), _LOAD_V5, "0.22.0"),
)


def transformers_entry_for(version: Version) -> Optional[TransformersEntry]:
    """The transformers-native hook entry whose range covers ``version``, or None (then nothing is hooked).

    Example:
        >>> from packaging.version import Version
        >>> transformers_entry_for(Version("4.30.0")) is None
        True
    """
    return next((entry for entry in TRANSFORMERS_REGISTRY if entry.covers(version)), None)


__all__ += ["TESTED_TORCH", "TRANSFORMERS_REGISTRY", "TransformersEntry", "transformers_entry_for"]


# ------------------------------------------------------------------ adapter-config fields per line (issue 12)
# Which adapter_config.json fields each line's config classes accept, with their defaults, is generated data:
# `peft_buffers/_config_fields.py` (`nox -s config_fields`), read by `python -m peft_buffers convert`. It is
# loaded on first use so that this module stays importable on its own (noxfile.py loads it without the package).

# Fields that say how a file was written, not how the adapter computes: convert drops them whatever they hold.
CONFIG_METADATA_FIELDS = ("peft_version",)


def config_fields_data():
    """The generated module: ``LINES``, ``PEFT_TYPES`` and ``FIELDS`` (per-line histories; see its docstring).

    Example:
        >>> config_fields_data().FIELDS["LoraConfig"]["use_dora"]  # first in 0.9, default False
        (('0.9', False),)
    """
    from . import _config_fields

    return _config_fields


__all__ += ["CONFIG_METADATA_FIELDS", "config_fields_data"]
