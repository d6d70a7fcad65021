"""``python -m peft_buffers doctor``: which versions are installed, which registry entry applies, what is patched.

The report answers the questions a bug report needs: the torch / PEFT / transformers versions, the registry
entry ``enable()`` picks for this PEFT, whether CI tests exactly this release (and with this transformers),
and every binding site and adapter hook, each patched or not. With ``--deep`` every PEFT submodule is imported
first, so a module that binds PEFT's state-dict functions but is missing from the registry entry shows up as
an unpatched binding site.

A path that cannot work with the installed pair is reported as UNUSABLE, with fixes that are pairs CI tests:
transformers' own adapter methods (``model.add_adapter``, ``load_adapter``, ...) refuse a PEFT older than the
installed transformers' ``MIN_PEFT_VERSION`` (transformers 5.24 wants PEFT >= 0.22). ``PeftModel`` is not
affected.

``--support-table`` prints the README's table of supported PEFT lines, generated from the registry;
``--update-readme`` writes it between the README's markers.

Exit status: 0 when the patch applies cleanly (an UNUSABLE transformers-native path included: PEFT's own
``PeftModel`` path works); 1 when it does not (unsupported PEFT, an unpatched site); with ``--strict`` also 1
when this PEFT release or its transformers is not the pair CI tests; 2 for a usage error. The last line,
``result: ...``, says which: it reads OK exactly when the exit status is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import pkgutil
import platform
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from packaging.version import Version

from .. import __version__, binding
from .._errors import CommandError, PeftBuffersError, escape
from ..binding import NATIVE_FIELDS_NOTE, mixin_min_peft, peft_has_native_fields
from ..binding._api_table import classify, installed_api
from ..binding.registry import (
    GET,
    README_END,
    README_START,
    REGISTRY,
    SET,
    TESTED_TORCH,
    PatchEntry,
    entry_for,
    range_text,
    readme_with_table,
    support_table,
    transformers_entry_for,
)

__all__ = ["HELP", "add_arguments", "doctor_report", "run", "verdict"]

HELP = "versions, registry entry, binding sites; what cannot work with this pair, and the fix"
NATIVE = "transformers-native adapters"
_MIXIN_SITE = "transformers.integrations.peft.PeftAdapterMixin."

_PACKAGES = ("torch", "peft", "transformers", "accelerate", "safetensors")


def _installed(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _import_every_peft_module() -> list[str]:
    """Import every PEFT submodule that imports here; return the ones that do not (e.g. bitsandbytes)."""
    import peft

    failed: list[str] = []
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with quiet[0], quiet[1], warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in pkgutil.walk_packages(peft.__path__, "peft.", onerror=failed.append):
            try:
                importlib.import_module(module.name)
            except Exception:  # noqa: BLE001 - an optional dependency is missing: that module binds nothing
                failed.append(module.name)
    return sorted(set(failed))


def _still_original() -> list[str]:
    """Modules that still bind PEFT's original functions by name although the patch is in place."""
    save_and_load = sys.modules["peft.utils.save_and_load"]
    found = []
    for name in (GET, SET):
        original = getattr(getattr(save_and_load, name), "__wrapped__", None)
        for module_name, module in list(sys.modules.items()):
            if original is not None and getattr(module, "__dict__", {}).get(name) is original:
                found.append(f"{module_name}.{name}")
    return sorted(found)


def _entry_summary(entry: PatchEntry) -> dict:
    return {"line": entry.line, "versions": range_text(entry), "tested": entry.tested,
            "transformers": entry.transformers}


def _accepts(transformers: str, peft_version: Version) -> bool:
    """Whether the adapter methods of ``transformers`` accept ``peft_version``, as the registry records them."""
    entry = transformers_entry_for(Version(transformers))
    return entry is None or entry.tested_min_peft is None or peft_version >= Version(entry.tested_min_peft)


def _native_fixes(peft_version: Version, transformers: str, minimum: Version) -> list[str]:
    """Fixes for transformers-native adapters that agree with the pairs CI tests (the registry's own pairs)."""
    fixes = []
    entry = entry_for(peft_version)
    if entry is not None and entry.transformers != transformers and _accepts(entry.transformers, peft_version):
        fixes.append(f"pip install transformers=={entry.transformers} (the pair CI tests with peft {entry.line}.x)")
    upgrades = [e for e in REGISTRY if Version(e.tested) > peft_version and Version(e.tested) >= minimum
                and _accepts(e.transformers, Version(e.tested))]
    if upgrades:
        newest = max(upgrades, key=lambda e: Version(e.tested))
        pins = f"peft=={newest.tested}" + ("" if newest.transformers == transformers
                                           else f" transformers=={newest.transformers}")
        fixes.append(f"pip install {pins} (CI tests peft {newest.tested} with transformers {newest.transformers})")
    fixes.append("use PEFT's PeftModel (get_peft_model, PeftModel.from_pretrained), which works with this pair")
    return fixes


def _unusable_paths(peft_version: Version, transformers: Optional[str]) -> list[dict]:
    """Paths that raise with this installed pair: transformers' own adapter methods below its minimum PEFT."""
    minimum = mixin_min_peft() if transformers else None
    if minimum is None or peft_version >= minimum:
        return []
    fix = "; or ".join(_native_fixes(peft_version, transformers, minimum))
    return [{"path": NATIVE,
             "reason": f"model.add_adapter, load_adapter, set_adapter, ... raise ValueError: transformers "
                       f"{transformers} requires peft >= {minimum} (its MIN_PEFT_VERSION), installed peft "
                       f"{peft_version}",
             "fix": fix}]


def doctor_report(deep: bool = False) -> dict:
    """Versions, the registry entry chosen, and every binding site and hook with its state, as a dict.

    Patches PEFT for the duration of the call when it is not patched already (and unpatches it again).
    ``deep=True`` imports every PEFT submodule first, so no binding site can hide in a module not yet imported.
    ``problems`` lists what stops the patch from working; ``notes`` what CI did not test; ``unusable`` the paths
    that raise with the installed pair (``path``, ``reason``, ``fix``), whatever peft_buffers does. A hook on such
    a path has ``"usable": False``.

    Example:
        >>> report = doctor_report()
        >>> report["versions"]["peft"] == str(binding.versions.installed_peft_version())
        True
    """
    versions = {"python": platform.python_version(), "peft_buffers": __version__}
    versions.update({name: _installed(name) for name in _PACKAGES})
    report: dict = {"versions": versions, "entry": None, "tested_release": False, "tested_transformers": False,
                    "sites": [], "hooks": [], "unpatched": [], "import_failures": [], "problems": [], "notes": [],
                    "unusable": []}
    report["native_fields"] = peft_has_native_fields()  # issue 11: PEFT's own save_running_stats/parameters_to_save
    if report["native_fields"]:
        report["notes"].append(NATIVE_FIELDS_NOTE)
    peft_version = binding.versions.installed_peft_version()
    report["unusable"] = _unusable_paths(peft_version, versions["transformers"])
    if versions["torch"] is not None and Version(versions["torch"]).public != TESTED_TORCH:
        report["notes"].append(f"CI tests torch {TESTED_TORCH}, not {versions['torch']}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untested release is reported below, in notes
            entry, _ = binding.versions.select_entry(peft_version)
    except PeftBuffersError as error:
        report["problems"].append(str(error))
        return report
    report["entry"] = _entry_summary(entry)
    report["tested_release"] = peft_version == Version(entry.tested)
    report["tested_transformers"] = versions["transformers"] == entry.transformers
    if not report["tested_release"]:
        report["notes"].append(f"CI tests the {entry.line}.x line with peft {entry.tested}, not {peft_version}")
    if not entry.covers(peft_version):
        report["notes"].append(f"peft {peft_version} is newer than every registry line: the {entry.line}.x entry "
                               f"is used because its binding sites and adapter methods match this release")
    if not report["tested_transformers"]:
        report["notes"].append(f"CI pairs peft {entry.line}.x with transformers {entry.transformers}, "
                               f"not {versions['transformers']}")
    if any(hook.kind == "hotswap_state_dict" for hook in entry.adapter_hooks):
        report["hotswap"] = ("peft.utils.hotswap swaps a file's extra state too while peft_buffers is enabled; "
                             "without it, PEFT's hotswap raises KeyError on a file that carries extra state")
    if deep:
        report["import_failures"] = _import_every_peft_module()
        report["adapter_api"] = adapter_api_rows(entry)
        report["problems"] += [f"{row['method']} is a public method of PEFT's adapter API that peft_buffers does not "
                               f"classify: whether it changes which adapter computes is unknown"
                               for row in report["adapter_api"] if row["kind"] is None]
    differences = binding.versions.structure_differences(entry)
    if differences:
        report["problems"] += [f"the {entry.line}.x entry does not match this peft: {d}" for d in differences]
        return report
    was_enabled = binding.is_enabled()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            binding.enable()  # as a user's call would: an untested release is reported in notes
        status = binding.patch_status()
        for site in status["sites"]:
            name = site["site"].rsplit(".", 1)[-1]
            if report["unusable"] and site["site"].startswith(_MIXIN_SITE):
                site = dict(site, usable=False)
            report["sites" if name in (GET, SET) else "hooks"].append(site)
        report["unpatched"] = _still_original()
        report["transformers_hooks"] = status.get("transformers")
    except PeftBuffersError as error:
        report["problems"].append(str(error))
    finally:
        if not was_enabled:
            binding.disable()
    for site in report["sites"] + report["hooks"]:
        if not site["patched"]:
            report["problems"].append(f"{site['site']} is not patched")
    for site in report["unpatched"]:
        if site.startswith("peft."):
            report["problems"].append(f"{site} still binds PEFT's original function: add its module to the "
                                      f"registry entry for peft {entry.line}")
        else:  # a user's module: `from peft.utils import get_peft_model_state_dict` ran before enable()
            report["problems"].append(f"{site} still binds PEFT's original function (imported before "
                                      f"peft_buffers.enable()): call enable() before that import")
    return report


def _format(report: dict, strict: bool = False) -> str:
    lines = ["peft_buffers doctor"]
    lines += [f"  {name:<13} {value or 'not installed'}" for name, value in report["versions"].items()]
    entry = report["entry"]
    if entry is not None:
        lines.append(f"registry entry: peft {entry['line']}.x ({entry['versions']}); CI tests peft "
                     f"{entry['tested']} with transformers {entry['transformers']}")
        yes_no = {True: "yes", False: "no"}
        lines.append(f"  this exact peft release tested in CI: {yes_no[report['tested_release']]}; "
                     f"with this transformers: {yes_no[report['tested_transformers']]}")
    if report["sites"]:
        lines.append(f"binding sites ({sum(s['patched'] for s in report['sites'])} of {len(report['sites'])} "
                     f"patched):")
        lines += [f"  [{'patched' if s['patched'] else 'NOT PATCHED'}] {s['site']}" for s in report["sites"]]
        lines.append("adapter hooks:")
        lines += [f"  [{_hook_state(s)}] {s['site']}" for s in report["hooks"]]
    if report.get("adapter_api"):
        rows = report["adapter_api"]
        lines.append(f"adapter API ({len(rows)} public methods; {sum(r['hooked'] for r in rows)} hooked):")
        lines += [f"  [{'hooked ' + r['kind'] if r['hooked'] else r['kind'] or 'NOT CLASSIFIED'}] {r['method']}: "
                  f"{r['meaning']}" for r in rows]
    if report.get("hotswap"):
        lines.append(f"hotswap: {report['hotswap']}")
    lines += [f"note: {note}" for note in report["notes"]]
    for path in report["unusable"]:
        lines.append(f"UNUSABLE: {path['path']}: {path['reason']}. Fix: {path['fix']}")
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    lines.append(verdict(report, strict)[1])
    return "\n".join(lines)


def adapter_api_rows(entry: PatchEntry) -> list[dict]:
    """The installed PEFT's adapter API as the registry classifies it: one row per public method.

    Example:
        >>> rows = adapter_api_rows(binding.versions.select_entry(binding.versions.installed_peft_version())[0])
        >>> next(r for r in rows if r["method"] == "PeftModel.load_adapter")["hooked"]
        True
    """
    hooked = {hook.target for hook in entry.adapter_hooks}
    rows = []
    for (owner, name), target in sorted(installed_api().items()):
        found = classify(owner, name)
        method = f"{owner}.{name}" if owner else target.replace(":", ".")
        rows.append({"method": method, "kind": found.kind if found else None,
                     "hooked": target in hooked, "meaning": found.meaning if found else ""})
    return rows


def verdict(report: dict, strict: bool = False) -> tuple[int, str]:
    """The exit status and the last line of the report: they always agree (a line that reads OK exits 0).

    Example:
        >>> verdict({"problems": [], "unusable": [], "entry": None, "tested_release": True,
        ...          "tested_transformers": True})
        (0, 'result: OK')
    """
    if report["problems"]:
        return 1, "result: problems found"
    tested = report["tested_release"] and report["tested_transformers"]
    if strict and not tested:
        return 1, f"result: FAILED (--strict): {_pair_text(report)}"
    if report["unusable"]:
        return 0, ("result: OK for PeftModel; UNUSABLE with this pair: "
                   + ", ".join(p["path"] for p in report["unusable"]) + " (fix above)")
    if not tested:
        return 0, f"result: OK; {_pair_text(report)} (notes above)"
    return 0, "result: OK"


def _pair_text(report: dict) -> str:
    versions, entry = report["versions"], report["entry"]
    return (f"peft {versions['peft']} with transformers {versions['transformers']} is not the pair CI tests "
            f"(peft {entry['tested']} with transformers {entry['transformers']})")


def _hook_state(site: dict) -> str:
    if not site["patched"]:
        return "NOT PATCHED"
    return "patched, unusable" if site.get("usable") is False else "patched"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json --deep --strict``, or ``--support-table`` / ``--update-readme [README]`` alone.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> parser.parse_args(["--update-readme"]).update_readme
        'README.md'
    """
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--deep", action="store_true", help="import every PEFT submodule before looking")
    parser.add_argument("--strict", action="store_true",
                        help="also fail (exit 1) unless this peft release and transformers are the pair CI tests")
    table = parser.add_mutually_exclusive_group()
    table.add_argument("--support-table", action="store_true",
                       help="print the table of supported PEFT lines (Markdown) and exit")
    table.add_argument("--update-readme", metavar="README", nargs="?", const="README.md",
                       help="rewrite the support table between the README's markers and exit (default: README.md, "
                            "run from the repository root)")


def _update_readme(path: str) -> None:
    readme = Path(path)
    if not readme.is_file():
        raise CommandError(f"{escape(readme)} not found (in {escape(Path.cwd())}): --update-readme rewrites the "
                           f"README of a peft_buffers clone; run it from the repository root or pass the README's path")
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise CommandError(f"{escape(readme)} has no {README_START} ... {README_END} markers: is it peft_buffers' "
                           f"README?")
    readme.write_text(readme_with_table(text), encoding="utf-8")
    print(f"updated the support table in {readme}")


def run(args: argparse.Namespace) -> int:
    """Print the report (or the support table); returns the exit status (see the module docstring).

    Example:
        >>> run(argparse.Namespace(support_table=True, update_readme=None))  # doctest: +ELLIPSIS
        | PEFT line | Versions | ...
        0
    """
    if args.support_table:
        print(support_table())
        return 0
    if args.update_readme:
        _update_readme(args.update_readme)
        return 0
    report = doctor_report(deep=args.deep)
    status, result = verdict(report, strict=args.strict)
    print(json.dumps({**report, "result": result}, indent=2) if args.json else _format(report, strict=args.strict))
    return status
