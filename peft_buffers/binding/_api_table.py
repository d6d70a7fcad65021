"""PEFT's adapter API, classified: every public method that could change which adapter computes, hooked with a
stated meaning for the extra state, or declared as not touching it, with the reason.

Plain data (no torch, no PEFT import): read by :mod:`.registry` (which builds each release line's hooks from
:data:`HOOKS`), by ``python -m peft_buffers doctor --deep`` (which prints the table for the installed PEFT) and
by the test that fails when the installed PEFT has a public method of :data:`CLASSES` the table does not
classify, so a new release cannot add a silent path.

Example:
    >>> classify("PeftModel", "unload").kind
    'unload'
    >>> classify("PeftModel", "get_base_model").kind
    'reads'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["CLASSES", "DOCS_END", "DOCS_START", "FUNCTIONS", "HOOKS", "HOOK_KINDS", "ApiMethod", "Hooked", "classify",
           "docs_with_table", "installed_api", "markdown_table"]


@dataclass(frozen=True)
class ApiMethod:
    """What a method means for the extra state: ``kind`` is a hook kind (hooked) or ``"reads"`` / ``"untouched"``."""

    kind: str
    meaning: str


@dataclass(frozen=True)
class Hooked:
    """One hooked method and the PEFT lines that define it there (``since``, ``until`` inclusive, ``""``: open)."""

    target: str  # "module.path:Class.method", or "module.path:function"
    kind: str
    since: str = "0.6"
    until: str = ""
    params: tuple[str, ...] = ("self",)
    method: str = ""  # kind "forward": the name __getattr__ forwards


# The classes and modules whose public API is classified (module path, qualified name). PeftModel's task
# subclasses in peft.peft_model are found by the test on its own.
CLASSES = (
    ("peft.peft_model", "PeftModel"),
    ("peft.mixed_model", "PeftMixedModel"),
    ("peft.tuners.tuners_utils", "BaseTuner"),
    ("peft.tuners.lora.model", "LoraModel"),
    ("peft.tuners.lycoris_utils", "LycorisTuner"),
    ("peft.tuners.loha.model", "LoHaModel"),
    ("peft.tuners.lokr.model", "LoKrModel"),
    ("peft.tuners.adalora.model", "AdaLoraModel"),
    ("peft.tuners.mixed.model", "MixedModel"),
)
FUNCTIONS = ("peft.utils.hotswap",)

_READS = "reads the model or its configuration; computes with whatever extra state is live"
_FORWARD = "runs the model with the extra state of the adapter that computes (the base model's when disabled)"
_PEFT_WEIGHTS = "changes PEFT's own weights or which of them train, not the base model's state"
_NEW_ADAPTER = ("adds an adapter that owns no extra state yet: it computes with the base model's values until "
                "it is trained or loaded; the active adapter does not change")

#: Meaning of each public name, the same on every class that has it unless :data:`_BY_CLASS` says otherwise.
_BY_NAME: dict[str, ApiMethod] = {
    # switching which adapter computes
    "set_adapter": ApiMethod("sync", "makes the named adapter's extra state live; with several names, the first "
                                     "one's (what training changes then belongs to each of them)"),
    "delete_adapter": ApiMethod("sync", "forgets the deleted adapter's extra state; the adapter that computes "
                                        "next has its own live"),
    "disable_adapter": ApiMethod("disable", "inside the context the base model's own values are live"),
    "disable_adapter_layers": ApiMethod("layers_off", "like disable_adapter(): the base model's own values are "
                                                      "live until enable_adapter_layers()"),
    "enable_adapter_layers": ApiMethod("layers_on", "brings the active adapter's extra state back"),
    "unload": ApiMethod("unload", "returns the base model with its own values live; the PeftModel keeps each "
                                  "adapter's extra state"),
    "merge_and_unload": ApiMethod("untouched", "returns the base model with the merged adapter's weights, and "
                                               "its extra state stays live, as the merged weights are its own"),
    "merge_adapter": ApiMethod("untouched", "merges adapter weights into base weights PEFT owns (never saved as "
                                            "extra state); which adapter's extra state is live does not change"),
    "unmerge_adapter": ApiMethod("untouched", "undoes merge_adapter(); the live extra state does not change"),
    "add_weighted_adapter": ApiMethod("combine", "the combined adapter carries no extra state (it computes with "
                                                 "the base model's values); a warning names what its sources carry"),
    # adapters in and out
    "load_adapter": ApiMethod("load", "loads the file's extra state as the new adapter's own, atomically"),
    "from_pretrained": ApiMethod("from_pretrained", "attaches to the base model and loads the file's extra state, "
                                                    "atomically"),
    "save_pretrained": ApiMethod("save", "the file carries what changed while the adapter was live"),
    "add_adapter": ApiMethod("untouched", _NEW_ADAPTER),
    "inject_adapter": ApiMethod("structure", "adds an adapter's modules (" + _NEW_ADAPTER + ")"),
    "hotswap_adapter": ApiMethod("hotswap", "checks the file, then hotswap_adapter_from_state_dict"),
    "hotswap_adapter_from_state_dict": ApiMethod("hotswap_state_dict", "writes the new adapter's extra state into "
                                                                       "the same tensors (a compiled model keeps "
                                                                       "its graph), validated and atomic"),
    "healthcheck": ApiMethod("report", "PEFT's report also lists what training will move outside the adapter"),
    # running the model
    "forward": ApiMethod("untouched", _FORWARD),
    "generate": ApiMethod("untouched", _FORWARD),
    "prepare_inputs_for_generation": ApiMethod("untouched", _FORWARD),
    # PEFT's own weights and flags
    "set_requires_grad": ApiMethod("untouched", _PEFT_WEIGHTS),
    "set_additional_trainable_modules": ApiMethod("untouched", _PEFT_WEIGHTS),
    "set_modules_to_save": ApiMethod("untouched", _PEFT_WEIGHTS),
    "set_auxiliary_adapters": ApiMethod("untouched", _PEFT_WEIGHTS),
    "prepare_model_for_gradient_checkpointing": ApiMethod("untouched", "makes the inputs require grad for "
                                                                       "checkpointing; no state changes"),
    "prepare_model_for_compiled_hotswap": ApiMethod("untouched", "pads LoRA weights to one rank: " + _PEFT_WEIGHTS),
    "subtract_mutated_init": ApiMethod("untouched", "converts PiSSA/OLoRA adapter weights: " + _PEFT_WEIGHTS),
    "subtract_pissa_init": ApiMethod("untouched", "converts PiSSA adapter weights: " + _PEFT_WEIGHTS),
    "resize_modules_by_rank_pattern": ApiMethod("untouched", "AdaLoRA rank allocation: " + _PEFT_WEIGHTS),
    "resize_state_dict_by_rank_pattern": ApiMethod("untouched", "AdaLoRA rank allocation: " + _PEFT_WEIGHTS),
    "update_and_allocate": ApiMethod("untouched", "AdaLoRA rank allocation: " + _PEFT_WEIGHTS),
    "create_or_update_model_card": ApiMethod("untouched", "writes README.md next to the adapter"),
    "print_healthcheck": ApiMethod("untouched", "prints healthcheck(), which carries peft_buffers' findings"),
    "check_hotswap_configs_compatible": ApiMethod("reads", _READS),
}
for _name in ("active_adapter", "active_adapters", "active_peft_config", "base_model_torch_dtype", "get_base_model",
              "get_layer_status", "get_model_status", "get_model_config", "get_nb_trainable_parameters",
              "get_peft_config_as_dict", "get_prompt", "get_prompt_embedding_to_save", "has_active_enabled_adapter",
              "layers_mapping", "modules_to_save", "peft_config", "prefix", "print_trainable_parameters",
              "supports_lora_conversion", "target_module_mapping", "tuner_layer_cls", "uses_shared_state"):
    _BY_NAME[_name] = ApiMethod("reads", _READS)

#: Where one class's method means something else than the name says elsewhere.
_BY_CLASS: dict[str, ApiMethod] = {
    "PeftMixedModel.load_adapter": ApiMethod("untouched", "calls PeftModel.load_adapter and set_adapter, both "
                                                          "hooked"),
    "PeftMixedModel.save_pretrained": ApiMethod("untouched", "raises NotImplementedError in PEFT"),
    "PeftMixedModel.merge_and_unload": ApiMethod("untouched", "forwards to the tuner's merge_and_unload"),
    "PeftMixedModel.unload": ApiMethod("untouched", "forwards to the tuner's unload, which is hooked"),
    "PeftModelForSequenceClassification.add_adapter": ApiMethod("untouched", _NEW_ADAPTER),
    "PeftModelForTokenClassification.add_adapter": ApiMethod("untouched", _NEW_ADAPTER),
    "PeftModelForQuestionAnswering.add_adapter": ApiMethod("untouched", _NEW_ADAPTER),
    "AdaLoraModel.add_weighted_adapter": ApiMethod("untouched", "raises TypeError in PEFT (AdaLoRA cannot combine)"),
    "MixedModel.add_weighted_adapter": ApiMethod("untouched", "raises NotImplementedError in PEFT"),
}

HOOK_KINDS = frozenset({"attach", "sync", "disable", "layers_off", "layers_on", "unload", "combine", "load",
                        "from_pretrained", "save", "structure", "hotswap", "hotswap_state_dict", "report", "forward"})


def classify(class_name: str, name: str) -> Optional[ApiMethod]:
    """How the table classifies ``class_name.name`` (None: not classified).

    Example:
        >>> classify("PeftMixedModel", "save_pretrained").kind
        'untouched'
        >>> classify("LoraModel", "made_up") is None
        True
    """
    return _BY_CLASS.get(f"{class_name}.{name}") or _BY_NAME.get(name)


_PEFT_MODEL = "peft.peft_model:PeftModel"
_MIXED = "peft.mixed_model:PeftMixedModel"
_BASE = "peft.tuners.tuners_utils:BaseTuner"
_LORA = "peft.tuners.lora.model:LoraModel"
_LYCORIS = "peft.tuners.lycoris_utils:LycorisTuner"
_MIXED_TUNER = "peft.tuners.mixed.model:MixedModel"
_ADAPTER = ("self", "adapter_name")


def _switching(owner: str, since: str, until: str = "", unload_since: str = "") -> tuple[Hooked, ...]:
    """A tuner class's adapter-switching methods, defined on it between ``since`` and ``until``."""
    return (
        Hooked(f"{owner}.set_adapter", "sync", since, until, ("self", "adapter_name")),
        Hooked(f"{owner}.delete_adapter", "sync", since, until, _ADAPTER),
        Hooked(f"{owner}.disable_adapter_layers", "layers_off", since, until),
        Hooked(f"{owner}.enable_adapter_layers", "layers_on", since, until),
        Hooked(f"{owner}.unload", "unload", unload_since or since, until),
    )


#: Every hooked method, with the release lines that define it on that class. A line's registry entry gets the
#: hooks whose range covers its tested release. PEFT 0.18 moved the switching methods from each tuner class to
#: BaseTuner; PeftModel.delete_adapter exists from 0.16 (before, PeftModel.__getattr__ forwards it).
HOOKS: tuple[Hooked, ...] = (
    Hooked(f"{_PEFT_MODEL}.__init__", "attach", params=("self", "model", "peft_config")),
    Hooked(f"{_PEFT_MODEL}.set_adapter", "sync", params=_ADAPTER),
    Hooked(f"{_PEFT_MODEL}.__getattr__", "forward", until="0.15", params=("self", "name"), method="delete_adapter"),
    Hooked(f"{_PEFT_MODEL}.delete_adapter", "sync", since="0.16", params=_ADAPTER),
    Hooked(f"{_PEFT_MODEL}.disable_adapter", "disable"),
    Hooked(f"{_PEFT_MODEL}.load_adapter", "load", params=("self", "model_id", "adapter_name")),
    Hooked(f"{_PEFT_MODEL}.from_pretrained", "from_pretrained", params=("cls", "model", "model_id", "adapter_name")),
    Hooked(f"{_PEFT_MODEL}.save_pretrained", "save", params=("self", "save_directory")),
    Hooked(f"{_PEFT_MODEL}.healthcheck", "report", since="0.22"),
    Hooked(f"{_MIXED}.__init__", "attach", since="0.7", params=("self", "model", "peft_config")),
    Hooked(f"{_MIXED}.set_adapter", "sync", since="0.7", params=_ADAPTER),
    Hooked(f"{_MIXED}.delete_adapter", "sync", since="0.7", params=_ADAPTER),
    Hooked(f"{_MIXED}.disable_adapter", "disable", since="0.7"),
    Hooked(f"{_MIXED}.from_pretrained", "from_pretrained", since="0.7",
           params=("cls", "model", "model_id", "adapter_name")),
    Hooked(f"{_BASE}.inject_adapter", "structure", params=("self", "model", "adapter_name")),
    *_switching(_LORA, "0.6", "0.17"),
    *_switching(_LYCORIS, "0.6", "0.17", unload_since="0.7"),
    Hooked(f"{_BASE}.disable_adapter_layers", "layers_off", since="0.11"),
    Hooked(f"{_BASE}.enable_adapter_layers", "layers_on", since="0.11"),
    Hooked(f"{_BASE}.set_adapter", "sync", since="0.18", params=("self", "adapter_name")),
    Hooked(f"{_BASE}.delete_adapter", "sync", since="0.18", params=_ADAPTER),
    Hooked(f"{_BASE}.unload", "unload", since="0.18"),
    Hooked(f"{_MIXED_TUNER}.set_adapter", "sync", since="0.7", params=("self", "adapter_name")),
    Hooked(f"{_MIXED_TUNER}.delete_adapter", "sync", since="0.7", params=("self", "adapter_name")),
    Hooked(f"{_MIXED_TUNER}.disable_adapter_layers", "layers_off", since="0.7", until="0.17"),
    Hooked(f"{_MIXED_TUNER}.enable_adapter_layers", "layers_on", since="0.7", until="0.17"),
    Hooked(f"{_MIXED_TUNER}.unload", "unload", since="0.7", until="0.17"),
    Hooked(f"{_LORA}.add_weighted_adapter", "combine", params=("self", "adapters", "weights", "adapter_name")),
    Hooked("peft.utils.hotswap:hotswap_adapter", "hotswap", since="0.14",
           params=("model", "model_name_or_path", "adapter_name")),
    Hooked("peft.utils.hotswap:hotswap_adapter_from_state_dict", "hotswap_state_dict", since="0.14",
           params=("model", "state_dict", "adapter_name")),
)


def installed_api() -> dict[tuple[str, str], str]:
    """The installed PEFT's adapter API: ``(class, name) -> "module:Class.name"`` of the class defining each public
    name of :data:`CLASSES` (and PeftModel's task subclasses), ``("", name)`` for the functions of
    :data:`FUNCTIONS`. Imports PEFT (this module itself does not).

    Example:
        >>> ("PeftModel", "unload") in installed_api()  # forwarded to the tuner: not PeftModel's own name
        False
        >>> installed_api()[("PeftModel", "load_adapter")]
        'peft.peft_model:PeftModel.load_adapter'
    """
    import importlib
    import inspect

    classes = []
    for module_name, class_name in CLASSES:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # a class a line does not have (PeftMixedModel before 0.7)
            continue
    peft_model = importlib.import_module("peft.peft_model")
    classes += [c for c in vars(peft_model).values()
                if inspect.isclass(c) and issubclass(c, peft_model.PeftModel) and c.__module__ == peft_model.__name__]
    found = {}
    for cls in classes:
        for name in dir(cls):
            if name.startswith("_"):
                continue
            owner = next(k for k in cls.__mro__ if name in k.__dict__)
            if owner.__module__.startswith("peft"):  # torch's and transformers' own methods are not PEFT's API
                found[(owner.__qualname__, name)] = f"{owner.__module__}:{owner.__qualname__}.{name}"
    for module_name in FUNCTIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # peft.utils.hotswap is new in 0.14
            continue
        for name, value in vars(module).items():
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", "") == module_name:
                found[("", name)] = f"{module_name}:{name}"
    return found


DOCS_START = "<!-- adapter-api:start -->"
DOCS_END = "<!-- adapter-api:end -->"


def markdown_table() -> str:
    """The meanings of the table as Markdown, hooked methods first (docs/internals.md carries it).

    Example:
        >>> markdown_table().splitlines()[0]
        '| method | peft_buffers | what it means for the extra state |'
    """
    rows = ["| method | peft_buffers | what it means for the extra state |", "| --- | --- | --- |"]
    entries = [(name, method) for name, method in _BY_NAME.items() if method.kind != "reads"]
    entries += [(name, method) for name, method in _BY_CLASS.items()
                if method != _BY_NAME.get(name.rpartition(".")[2])]  # a class's own meaning only where it differs
    for name, method in sorted(entries, key=lambda item: (item[1].kind not in HOOK_KINDS, item[0])):
        rows.append(f"| `{name}` | {'hooked' if method.kind in HOOK_KINDS else 'not hooked'} | {method.meaning} |")
    reads = sorted(name for name, method in _BY_NAME.items() if method.kind == "reads")
    rows.append(f"| {', '.join(f'`{name}`' for name in reads)} | not hooked | {_READS} |")
    return "\n".join(rows)


def docs_with_table(text: str) -> str:
    """``text`` with the part between :data:`DOCS_START` and :data:`DOCS_END` replaced by :func:`markdown_table`.

    Example:
        >>> docs_with_table(f"a\\n{DOCS_START}\\nold\\n{DOCS_END}\\nb").count("| `unload` |")
        1
    """
    head, start, rest = text.partition(DOCS_START)
    _, end, tail = rest.partition(DOCS_END)
    if not start or not end:
        raise ValueError(f"no {DOCS_START} ... {DOCS_END} markers")
    return f"{head}{start}\n{markdown_table()}\n{end}{tail}"


if __name__ == "__main__":  # python -m peft_buffers.binding._api_table docs/internals.md: regenerate its table
    import sys
    from pathlib import Path

    for path in sys.argv[1:]:
        Path(path).write_text(docs_with_table(Path(path).read_text(encoding="utf-8")), encoding="utf-8")
