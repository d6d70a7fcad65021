"""Generate :mod:`peft_buffers.binding._config_fields`: which adapter-config fields each PEFT release line knows.

Run by ``nox -s config_fields`` (``noxfile.py``), which calls this module in every line's compat venv:

    python -m peft_buffers.cli._fieldscan --dump DIR/0.13.json     # in a line's venv: the installed PEFT's fields
    python -m peft_buffers.cli._fieldscan --write DIR              # merge DIR/*.json into _config_fields.py

:func:`live_config_fields` reads the installed PEFT (``PEFT_TYPE_TO_CONFIG_MAPPING`` and each config
dataclass); :func:`data_mismatches` compares it with the generated data (used by ``tests/test_config_fields.py``
on the installed PEFT and by ``nox -s crossversion`` on every line).

Example:
    >>> merge({"0.6": {"LORA": {"class": "LoraConfig", "fields": {"r": 8}}},
    ...        "0.7": {"LORA": {"class": "LoraConfig", "fields": {"r": 8, "use_dora": False}}}})["FIELDS"]
    {'LoraConfig': {'r': (('0.6', 8),), 'use_dora': (('0.7', False),)}}
    >>> merge({"0.6": {"BONE": {"class": "BoneConfig", "fields": {}}}, "0.7": {}})["PEFT_TYPES"]
    {'BONE': (('0.6', 'BoneConfig'), ('0.7', '<absent>'))}
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

from packaging.version import Version

MODULE = Path(__file__).parents[1] / "binding" / "_config_fields.py"
# Markers in the generated data (plain strings: no PEFT default is either).
ABSENT = "<absent>"
REQUIRED = "<required>"


def jsonable(value: Any) -> Any:
    """``value`` as PEFT writes it to ``adapter_config.json`` (sets as sorted lists, enums as their value).

    Example:
        >>> jsonable({"a": {3, 1}, "b": (1, None)})
        {'a': [1, 3], 'b': [1, None]}
    """
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(item) for item in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config default {value!r} of type {type(value).__name__} has no JSON form")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return jsonable(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return jsonable(field.default_factory())
    return REQUIRED


def live_config_fields() -> dict[str, dict[str, Any]]:
    """The installed PEFT's config classes: ``{peft_type: {"class": name, "fields": {field: JSON default}}}``.

    Only fields ``__init__`` accepts count: ``PeftConfig.from_pretrained`` passes the file's keys as keyword
    arguments, which is where an older PEFT fails on a newer file.

    Example:
        >>> live_config_fields()["LORA"]["fields"]["r"]
        8
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    scanned = {}
    for peft_type, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        name = peft_type.value if isinstance(peft_type, enum.Enum) else str(peft_type)
        fields = {f.name: _default(f) for f in dataclasses.fields(config_class) if f.init}
        scanned[name] = {"class": config_class.__name__, "fields": dict(sorted(fields.items()))}
    return dict(sorted(scanned.items()))


def _history(values: list[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """``(line, value)`` at the first line with a value and at every change after it (``ABSENT`` included)."""
    changes: list[tuple[str, Any]] = []
    for line, value in values:
        if (changes and json.dumps(changes[-1][1]) == json.dumps(value)) or (not changes and value == ABSENT):
            continue
        changes.append((line, value))
    return tuple(changes)


def merge(dumps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge per-line scans (``{line: live_config_fields()}``) into the data of ``_config_fields.py``.

    A history lists ``(line, value)`` for the first line that has the peft_type (value: its class) or the field
    (value: its default) and for every later line where that changes; ``ABSENT`` marks a line that dropped it.
    See the module example.
    """
    lines = sorted(dumps, key=Version)
    types = sorted({peft_type for dump in dumps.values() for peft_type in dump})
    peft_types = {t: _history([(line, dumps[line].get(t, {}).get("class", ABSENT)) for line in lines]) for t in types}
    fields: dict[str, dict[str, tuple]] = {}
    for class_name in sorted({scan["class"] for dump in dumps.values() for scan in dump.values()}):
        # per line, the class's fields (a line without the class says nothing about them)
        per_line = [(line, next(s["fields"] for s in dumps[line].values() if s["class"] == class_name))
                    for line in lines if any(s["class"] == class_name for s in dumps[line].values())]
        names = sorted({name for _, scanned in per_line for name in scanned})
        fields[class_name] = {name: _history([(line, scanned.get(name, ABSENT)) for line, scanned in per_line])
                              for name in names}
    return {"LINES": tuple(lines), "PEFT_TYPES": peft_types, "FIELDS": fields}


def render(data: dict[str, Any]) -> str:
    """The source of ``_config_fields.py`` for ``merge()``'s data (data only: no torch or PEFT import).

    Example:
        >>> "FIELDS = {" in render(merge({"0.6": {"LORA": {"class": "LoraConfig", "fields": {"r": 8}}}}))
        True
    """
    fields = []
    for class_name, history in data["FIELDS"].items():
        fields.append(f"    {class_name!r}: {{")
        fields += [f"        {name!r}: {changes!r}," for name, changes in history.items()]
        fields.append("    },")
    peft_types = [f"    {peft_type!r}: {entry!r}," for peft_type, entry in data["PEFT_TYPES"].items()]
    lines = textwrap.fill(f"LINES = {data['LINES']!r}", width=120, subsequent_indent="         ")
    nl = "\n"
    return f'''"""Which adapter-config fields each PEFT release line knows: data, generated, do not edit.

Regenerate with ``nox -s config_fields`` (runs ``python -m peft_buffers.cli._fieldscan`` in every line's compat venv).
Read through ``peft_buffers.binding.registry.config_fields_data()``; used by ``python -m peft_buffers convert``.

* ``LINES``: the registry lines scanned (each on its tested release);
* ``PEFT_TYPES``: ``peft_type`` -> history: ``(line, config class)`` for the first line whose
  ``PEFT_TYPE_TO_CONFIG_MAPPING`` has it and each later line where that changes (``ABSENT``: dropped);
* ``FIELDS``: config class -> field -> history: ``(line, default)`` for the first line that accepts the field
  (keyword of the class's ``__init__``) and each later line where its JSON default changes; ``ABSENT``:
  that line dropped the field; ``REQUIRED``: no default.
"""

ABSENT = {ABSENT!r}
REQUIRED = {REQUIRED!r}

{lines}

PEFT_TYPES = {{
{nl.join(peft_types)}
}}

FIELDS = {{
{nl.join(fields)}
}}
'''


def data_mismatches(line: str, live: Optional[dict[str, Any]] = None) -> list[str]:
    """Where the generated data disagrees with the installed PEFT (of registry line ``line``); empty if none.

    Example:
        >>> data_mismatches("0.21", live={})[:1]
        ['peft_type ADALORA: only the data has it on 0.21']
    """
    from ..binding.registry import config_fields_data

    data = config_fields_data()

    live = live_config_fields() if live is None else live
    found = []
    if line not in data.LINES:
        return [f"line {line} is not in the data (lines {', '.join(data.LINES)}): run `nox -s config_fields`"]
    expected = {t: default_on(history, line) for t, history in data.PEFT_TYPES.items()}
    expected_types = {t for t, class_name in expected.items() if class_name != ABSENT}
    for peft_type in sorted(expected_types ^ set(live)):
        side = "the data" if peft_type in expected_types else "the installed PEFT"
        found.append(f"peft_type {peft_type}: only {side} has it on {line}")
    for peft_type in sorted(expected_types & set(live)):
        class_name = live[peft_type]["class"]
        if class_name != expected[peft_type]:
            found.append(f"peft_type {peft_type}: class {class_name}, the data says {expected[peft_type]}")
            continue
        known = {name: default_on(history, line) for name, history in data.FIELDS[class_name].items()}
        known = {name: default for name, default in known.items() if default != ABSENT}
        live_fields = live[peft_type]["fields"]
        for name in sorted(set(known) | set(live_fields)):
            if name not in live_fields:
                found.append(f"{class_name}: the data has field {name} on {line}, the installed PEFT has not")
            elif name not in known:
                found.append(f"{class_name}: the installed PEFT has field {name}, the data has not on {line}")
            elif json.dumps(known[name]) != json.dumps(live_fields[name]):
                found.append(f"{class_name}.{name}: default {live_fields[name]!r}, the data says {known[name]!r}")
    return found


def default_on(history: tuple, line: str) -> Any:
    """The field's default on ``line`` from its history, or ``ABSENT`` when that line does not accept it.

    Example:
        >>> default_on((("0.7", False), ("0.10", True)), "0.9"), default_on((("0.7", False),), "0.6")
        (False, '<absent>')
    """
    value: Any = ABSENT
    for changed_on, default in history:
        if Version(changed_on) > Version(line):
            break
        value = default
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_buffers.cli._fieldscan", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--dump", metavar="JSON", type=Path, help="write the installed PEFT's fields (one line)")
    action.add_argument("--write", metavar="DIR", type=Path, help=f"merge DIR/<line>.json into {MODULE.name}")
    args = parser.parse_args(argv)
    if args.dump:
        import peft

        from ..binding.registry import entry_for

        entry = entry_for(Version(peft.__version__))
        if entry is None or entry.tested != peft.__version__:
            print(f"PEFT {peft.__version__} is no registry line's tested release", file=sys.stderr)
            return 1
        args.dump.write_text(json.dumps(live_config_fields(), indent=1) + "\n")
        print(f"{args.dump}: {entry.line} (PEFT {peft.__version__})")
        return 0
    dumps = {path.stem: json.loads(path.read_text()) for path in sorted(args.write.glob("*.json"))}
    MODULE.write_text(render(merge(dumps)))
    print(f"{MODULE}: written from {len(dumps)} lines' scans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
