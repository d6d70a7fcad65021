"""``python -m peft_buffers convert SRC --to-peft VERSION --out DST``: adapter folders for an older PEFT.

An older PEFT builds the config with ``ConfigClass(**adapter_config.json)`` and fails on a field it does not
know (``LoraConfig.__init__() got an unexpected keyword argument 'alora_invocation_tokens'``) before any tensor
is read. :func:`convert` drops such fields when they hold their default value (the adapter computes the same
without them) and refuses, naming the field, its value and the first release that supports it, when they
do not. Which fields each release line knows comes from the generated data in ``_config_fields.py`` (read
through ``binding.registry``). Every other file, the tensors included, is copied byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from packaging.version import InvalidVersion, Version

from .._errors import ConversionRefused, escape
from .._text import plural
from ..binding.registry import CONFIG_METADATA_FIELDS, REGISTRY, config_fields_data, entry_for, supported_range
from ._common import print_error

__all__ = ["ConfigChange", "ConversionRefused", "ConvertReport", "convert"]

CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class ConfigChange:
    """One field ``convert`` drops from one ``adapter_config.json`` (``reason``: why that is safe)."""

    config: str  # path relative to the source folder
    name: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.config}: drop {self.name} = {json.dumps(self.value)} ({self.reason})"


@dataclass
class ConvertReport:
    """What :func:`convert` did (or, with ``check=True``, would do)."""

    source: Path
    target_line: str
    target_tested: str
    configs: list[str] = field(default_factory=list)
    dropped: list[ConfigChange] = field(default_factory=list)
    written: Optional[Path] = None

    def __str__(self) -> str:
        head = (f"{self.source} -> PEFT {self.target_line} (fields as in {self.target_tested}): "
                f"{plural(len(self.configs), 'adapter config')}, {plural(len(self.dropped), 'field')} dropped")
        tail = f"written to {self.written}" if self.written else "nothing written (--check)"
        return "\n".join([head, *(f"  {change}" for change in self.dropped), tail])


def _target_entry(version: str):
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise ValueError(f"--to-peft {version!r} is not a version; expected e.g. 0.13 or 0.13.2") from None
    entry = entry_for(parsed)
    if entry is None:
        raise ValueError(f"--to-peft {version}: no registry line covers it (supported: {supported_range()}); "
                         f"choose a PEFT release in that range")
    data = config_fields_data()
    if entry.line not in data.LINES:
        raise ValueError(f"the config-field data has no line {entry.line} (has {', '.join(data.LINES)}): "
                         f"regenerate it with `nox -s config_fields`")
    return entry


def _first_line_with(history: tuple, after: str) -> tuple[Optional[str], Any]:
    """The first line after ``after`` that accepts the field, and its default there (None, None if none)."""
    data = config_fields_data()
    for line, default in history:
        if Version(line) > Version(after) and default != data.ABSENT:
            return line, default
    return None, None


def _plan(config: dict[str, Any], config_path: str, target: str) -> tuple[list[ConfigChange], list[str]]:
    """The fields to drop from one config so PEFT line ``target`` accepts it, and the problems refusing that."""
    from ._fieldscan import default_on

    data = config_fields_data()
    peft_type = config.get("peft_type")
    if peft_type not in data.PEFT_TYPES:
        return [], [f"{config_path}: peft_type {peft_type!r} is unknown to every line scanned "
                    f"({data.LINES[0]} ... {data.LINES[-1]}); expected one of {', '.join(data.PEFT_TYPES)}"]
    type_history = data.PEFT_TYPES[peft_type]
    class_name = default_on(type_history, target)
    if class_name == data.ABSENT:
        having = [line for line in data.LINES if default_on(type_history, line) != data.ABSENT]
        newer = [line for line in having if Version(line) > Version(target)]
        where = (f"is first supported by PEFT {newer[0]}; PEFT {target} has no such adapter type. Load it on PEFT "
                 f">= {newer[0]}" if newer else
                 f"is not in PEFT {target} (last in PEFT {having[-1]}). Load it on PEFT <= {having[-1]}")
        class_names = sorted({value for _, value in type_history if value != data.ABSENT})
        return [], [f"{config_path}: peft_type {peft_type} ({', '.join(class_names)}) {where}"]
    fields = data.FIELDS[class_name]
    drops, problems = [], []
    for name, value in config.items():
        history = fields.get(name)
        if history is None:
            problems.append(f"{config_path}: field {name} = {json.dumps(value)} is unknown to {class_name} on every "
                            f"line scanned ({data.LINES[0]} ... {data.LINES[-1]}); cannot tell whether PEFT "
                            f"{target} loads it the same. Remove it by hand if you know it is inert")
            continue
        if default_on(history, target) != data.ABSENT:
            continue  # the target release accepts the field: keep it as it is
        if name in CONFIG_METADATA_FIELDS:
            drops.append(ConfigChange(config_path, name, value, "metadata, no effect on the adapter"))
            continue
        since, default = _first_line_with(history, target)
        if since is None:  # the field was dropped before the target: compare with its last default
            since = [line for line in data.LINES if default_on(history, line) != data.ABSENT and
                     Version(line) < Version(target)][-1]
            default = default_on(history, since)
            known = status = f"no longer in PEFT {target} (last in PEFT {since})"
            support = f"<= {since}"
        else:
            known, status, support = f"first in PEFT {since}", f"first supported by PEFT {since}", f">= {since}"
        if json.dumps(value, sort_keys=True) == json.dumps(default, sort_keys=True):
            drops.append(ConfigChange(config_path, name, value, f"the default; {known}"))
        else:
            problems.append(f"{config_path}: field {name} = {json.dumps(value)} is {status} "
                            f"(default there: {json.dumps(default)}); PEFT {target} does not know it and the "
                            f"adapter would compute differently without it. Load it on PEFT {support}")
    return drops, problems


def convert(source: Union[str, Path], to_peft: str, out: Optional[Union[str, Path]] = None,
            check: bool = False) -> ConvertReport:
    """Make the adapter folder ``source`` loadable by PEFT ``to_peft``, written to ``out`` (new folder).

    Every ``adapter_config.json`` under ``source`` (a multi-adapter save has one per adapter folder) loses the
    fields that release does not know, provided each holds its default value (``peft_version``, metadata, is
    dropped whatever it holds); any other such field raises :class:`ConversionRefused` and nothing is written.
    All other files are copied byte for byte. With ``check=True`` nothing is written, only reported.

    Example:
        >>> import json, tempfile, pathlib
        >>> src = pathlib.Path(tempfile.mkdtemp()) / "adapter"
        >>> src.mkdir()
        >>> _ = (src / "adapter_config.json").write_text(json.dumps(
        ...     {"peft_type": "LORA", "r": 8, "use_dora": False, "peft_version": "0.21.2"}))
        >>> report = convert(src, "0.6", check=True)
        >>> [change.name for change in report.dropped]
        ['use_dora', 'peft_version']
        >>> (src / "adapter_config.json").read_text().count("use_dora")  # --check wrote nothing
        1
    """
    source = Path(source)
    entry = _target_entry(to_peft)
    if not source.is_dir():
        raise FileNotFoundError(f"{escape(source)}: no such adapter folder")
    config_paths = sorted(source.rglob(CONFIG_NAME))
    if not config_paths:
        raise FileNotFoundError(f"{escape(source)}: no {CONFIG_NAME} in it or below; expected a folder written by "
                                f"save_pretrained")
    report = ConvertReport(source, entry.line, entry.tested, [str(p.relative_to(source)) for p in config_paths])
    configs, problems = {}, []
    for path, relative in zip(config_paths, report.configs):
        try:
            configs[relative] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            problems.append(f"{relative}: not valid JSON ({error})")
            continue
        drops, refusals = _plan(configs[relative], relative, entry.line)
        report.dropped += drops
        problems += refusals
    if problems:
        raise ConversionRefused(entry.line, problems)
    if check:
        return report
    if out is None:
        raise ValueError("convert needs an output folder (out=..., --out DST) unless check=True (--check)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{escape(out)} exists; convert writes a new folder: choose another --out or remove "
                              f"it")
    if out.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"--out {escape(out)} is inside the source folder {escape(source)}; choose a folder "
                         f"outside it")
    shutil.copytree(source, out, copy_function=shutil.copyfile)  # plain byte copies
    for relative, config in configs.items():
        dropped = {change.name for change in report.dropped if change.config == relative}
        if dropped:
            kept = {name: value for name, value in config.items() if name not in dropped}
            # as PEFT's save_pretrained writes it
            (out / relative).write_text(json.dumps(kept, indent=2, sort_keys=True))
    report.written = out
    return report


HELP = "rewrite an adapter folder so an older PEFT release loads it"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m peft_buffers convert``: the command line of :func:`convert`; 0 converted, 1 refused.

    Example:
        >>> main(["/nonexistent", "--to-peft", "0.13", "--check"])  # doctest: +SKIP
        1
    """
    parser = argparse.ArgumentParser(prog="python -m peft_buffers convert", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = f"{REGISTRY[0].line} ... {REGISTRY[-1].line}"
    parser.add_argument("source", metavar="SRC", type=Path, help="adapter folder written by save_pretrained")
    parser.add_argument("--to-peft", required=True, metavar="VERSION",
                        help=f"PEFT release that must load it (a registry line: {lines}, e.g. 0.13 or 0.13.2)")
    # One of the two, never both: the usage line shows (--out DST | --check), and each help says so.
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", metavar="DST", type=Path,
                        help="new folder to write the converted copy to (or --check, not both)")
    action.add_argument("--check", action="store_true",
                        help="only report what would change; write nothing (instead of --out)")


def run(args: argparse.Namespace) -> int:
    try:
        report = convert(args.source, args.to_peft, out=args.out, check=args.check)
    except (ConversionRefused, ValueError, FileNotFoundError, FileExistsError) as error:
        print_error("convert", str(error))
        return 1
    print(report)
    return 0
