"""audit(model): a context manager around training that says what training changed, and what is saved."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from .. import binding as pv
from .._errors import escape
from .._text import plural
from ..binding import extra_state_for_report, is_enabled
from ._common import TensorEntry, adapter_tensors, base_tensors, saved_layout
from ._fingerprint import EXACT_BELOW_BYTES, Fingerprint, fingerprint

__all__ = ["Audit", "AuditEntry", "AuditReport", "audit"]

NOT_SAVED = "CHANGED BUT NOT SAVED"
SAVED_BY_PEFT_BUFFERS = "saved by peft_buffers"
SAVED_BY_PEFT = "saved by PEFT"


@dataclass(frozen=True)
class AuditEntry:
    """One tensor that changed during the audit, or a trainable adapter tensor (changed or not)."""

    name: str  # relative to the base model
    key: str  # state-dict key in the root model
    part: str  # "base" or "adapter"
    what: str  # "parameter" or "buffer"
    changed: bool
    trainable: bool  # requires_grad when the audit started
    saved_by: Optional[str]  # "PEFT", "peft_buffers", or None
    exact: bool  # compared against a copy (else against an on-device checksum)
    max_abs_diff: Optional[float]  # known for copied floating tensors
    note: str = ""

    @property
    def status(self) -> str:
        if self.part == "adapter":
            if not self.changed:
                return "NOT CHANGED (trainable)"
            return "changed" if self.trainable else "changed (although frozen)"
        if self.saved_by == "PEFT":
            return SAVED_BY_PEFT
        if self.saved_by == "peft_buffers":
            return SAVED_BY_PEFT_BUFFERS
        return f"{NOT_SAVED}{f' ({self.note})' if self.note else ''}"


class AuditReport:
    """What an :func:`audit` found. Filled when the ``with`` block exits.

    ``base_changed``: base-model tensors that changed, each marked saved (by PEFT or peft_buffers) or not;
    ``not_saved``: the changed base tensors that the adapter file will not carry;
    ``adapters_changed`` / ``adapters_unchanged``: trainable adapter tensors that did / did not change.
    """

    def __init__(self, adapter_name: Optional[str]):
        self.adapter_name = adapter_name
        self.finished = False
        self.peft_buffers_enabled = False
        self.entries: list[AuditEntry] = []
        self.base_total = 0
        self.exact_count = 0
        self.checksum_count = 0
        self.appeared: list[str] = []
        self.disappeared: list[str] = []

    @property
    def base_changed(self) -> list[AuditEntry]:
        return [e for e in self.entries if e.part == "base" and e.changed]

    @property
    def not_saved(self) -> list[AuditEntry]:
        return [e for e in self.base_changed if e.saved_by is None]

    @property
    def adapters_changed(self) -> list[AuditEntry]:
        return [e for e in self.entries if e.part == "adapter" and e.changed]

    @property
    def adapters_unchanged(self) -> list[AuditEntry]:
        return [e for e in self.entries if e.part == "adapter" and not e.changed]

    def assert_only_adapters_changed(self, allow: Iterable[str] = ()) -> None:
        """Raise AssertionError listing every base-model tensor that training should not have changed, and
        fail when no trainable adapter tensor changed at all.

        Allowed to change: buffers that peft_buffers saves (BatchNorm statistics, spectral-norm vectors,
        observers and router biases move whenever a model trains), tensors PEFT saves itself, and names
        matching a pattern in ``allow`` (``fnmatch``
        patterns on the names shown in the report, e.g. ``"vit.embeddings.*"`` for parameters you meant to
        train). A changed base *parameter* is an offender even when peft_buffers saves it: it was trainable.

        Example:
            >>> import torch
            >>> from peft import LoraConfig, get_peft_model
            >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
            ...                        LoraConfig(target_modules=["0"], init_lora_weights=False))
            >>> with audit(model) as report:
            ...     model(torch.ones(1, 4)).sum().backward()
            ...     torch.optim.SGD(model.parameters(), lr=0.1).step()
            >>> report.assert_only_adapters_changed()
        """
        self._require_finished()
        patterns = [allow] if isinstance(allow, str) else list(allow)
        offenders = [
            e for e in self.base_changed
            if not (e.saved_by == "PEFT" or (e.saved_by == "peft_buffers" and e.what == "buffer"))
            and not any(fnmatch.fnmatchcase(e.name, pattern) for pattern in patterns)
        ]
        problems = [f"  - {escape(e.name)} ({e.what}): {e.status}" for e in offenders]
        trainable = [e for e in self.entries if e.part == "adapter" and e.trainable]
        if trainable and not self.adapters_changed:
            problems.append(f"  - none of the {len(trainable)} trainable adapter tensors changed: was the optimizer "
                            f"built with the PEFT model's parameters, and did it step?")
        if problems:
            them = "them" if len(offenders) > 1 else "it"
            head = (f"training changed {plural(len(offenders), 'base-model tensor')} besides the adapter (freeze "
                    f"{them}, or pass {'their names' if len(offenders) > 1 else 'its name'} in allow=[...] if you "
                    f"meant to train {them}):"
                    if offenders else "training did not change the adapter:")
            raise AssertionError("\n".join([head, *problems]))

    def _require_finished(self) -> None:
        if not self.finished:
            raise RuntimeError("the audit is still running: use the report after the `with audit(model)` block")

    def __str__(self) -> str:
        if not self.finished:
            return "peft_buffers.audit: still running (the report is filled when the with-block exits)"
        trainable = [e for e in self.entries if e.part == "adapter" and e.trainable]
        state = "enabled" if self.peft_buffers_enabled else "NOT enabled"
        lines = [
            f"peft_buffers.audit of adapter {self.adapter_name!r} (peft_buffers {state}):",
            f"  base model: {len(self.base_changed)} of {self.base_total} tensors changed, "
            f"{len(self.not_saved)} {NOT_SAVED} ({self.exact_count} compared with a copy, "
            f"{self.checksum_count} with an on-device checksum)",
            f"  adapter: {sum(e.trainable for e in self.adapters_changed)} of {len(trainable)} trainable tensors "
            f"changed",
        ]
        rows = sorted(self.base_changed, key=lambda e: e.saved_by is not None)
        rows += self.adapters_changed + self.adapters_unchanged
        if rows:
            name_width = max(len("tensor"), *(len(e.name) for e in rows))
            lines.append(f"  {'tensor':<{name_width}}  {'part':<7}  {'what':<9}  {'max |Δ|':>9}  status")
            for e in rows:
                unknown = "" if e.exact else "(hash)"
                delta = f"{e.max_abs_diff:9.3g}" if e.max_abs_diff is not None else f"{unknown:>9}"
                lines.append(f"  {e.name:<{name_width}}  {e.part:<7}  {e.what:<9}  {delta}  {e.status}")
        if self.appeared:
            lines.append(f"  tensors added during the audit (not compared): {', '.join(self.appeared)}")
        if self.disappeared:
            lines.append(f"  tensors removed during the audit: {', '.join(self.disappeared)}")
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class _Snapshot:
    entry: TensorEntry
    fingerprint: Fingerprint
    trainable: bool


def _peft_saved_keys(model: nn.Module, adapter_name: Optional[str]) -> set[str]:
    """Keys PEFT itself saves for ``adapter_name`` (without peft_buffers' additions)."""
    if adapter_name is None or adapter_name not in getattr(model, "peft_config", {}):
        return set()
    from peft.utils import save_and_load

    original = getattr(save_and_load.get_peft_model_state_dict, "__wrapped__", save_and_load.get_peft_model_state_dict)
    try:
        return set(pv.quiet(original, model, adapter_name=adapter_name))
    except Exception:  # noqa: BLE001 - a model PEFT cannot save claims nothing
        return set()


def _extra_keys(model: nn.Module, adapter_name: Optional[str]) -> set[str]:
    if adapter_name is None or adapter_name not in getattr(model, "peft_config", {}):
        return set()
    return set(extra_state_for_report(model, adapter_name))


class Audit:
    """The context manager returned by :func:`audit`; entering it returns the (empty) :class:`AuditReport`."""

    def __init__(self, model: nn.Module, adapter_name: Optional[str], exact_below_bytes: int):
        self.model = model
        self.exact_below_bytes = exact_below_bytes
        self.report = AuditReport(adapter_name)
        self._before: dict[str, tuple[str, _Snapshot]] = {}

    def _tensors(self) -> dict[str, tuple[str, TensorEntry]]:
        saved_layout(self.model)
        base = base_tensors(self.model)
        found = {key: ("base", entry) for key, entry in base.items()}
        found.update({key: ("adapter", entry) for key, entry in adapter_tensors(self.model, base).items()})
        return found

    def __enter__(self) -> AuditReport:
        for key, (part, entry) in self._tensors().items():
            tensor = entry.tensor
            self._before[key] = (part, _Snapshot(entry, fingerprint(tensor, self.exact_below_bytes),
                                                 bool(entry.is_parameter and tensor.requires_grad)))
        return self.report

    def __exit__(self, *exc_info) -> bool:
        report = self.report
        adapter = report.adapter_name if report.adapter_name is not None else pv.active_adapter(self.model)
        report.adapter_name = adapter
        report.peft_buffers_enabled = is_enabled()
        peft_keys = _peft_saved_keys(self.model, adapter)
        extra_keys = _extra_keys(self.model, adapter)
        now = self._tensors()
        for key, (part, snap) in self._before.items():
            if key not in now:
                report.disappeared.append(snap.entry.name)
                continue
            tensor = now[key][1].tensor
            fp = snap.fingerprint
            if part == "base":
                report.base_total += 1
                report.exact_count += fp.exact
                report.checksum_count += not fp.exact
            changed = not fp.matches(tensor)
            if not changed and not (part == "adapter" and snap.trainable):
                continue
            saved_by, note = None, ""
            if part == "base" and changed:
                if key in peft_keys:
                    saved_by = "PEFT"
                elif key in extra_keys and report.peft_buffers_enabled:
                    saved_by = "peft_buffers"
                elif key in extra_keys:
                    note = "peft_buffers would save it: call peft_buffers.enable() before saving"
            report.entries.append(AuditEntry(
                name=snap.entry.name, key=key, part=part, what=snap.entry.what, changed=changed,
                trainable=snap.trainable, saved_by=saved_by, exact=fp.exact,
                max_abs_diff=fp.max_abs_diff(tensor) if changed else None, note=note,
            ))
        report.appeared = [entry.name for key, (_, entry) in now.items() if key not in self._before]
        report.finished = True
        self._before.clear()  # drop the copies
        return False


def audit(model: nn.Module, adapter_name: Optional[str] = None, *,
          exact_below_bytes: int = EXACT_BELOW_BYTES) -> Audit:
    """Context manager around training: on exit, its report says what training changed and what is saved.

    Base-model parameters and buffers that changed are marked "saved by peft_buffers" (every changed buffer
    and base parameter the adapter's file carries, when peft_buffers is enabled), "saved by PEFT", or
    "CHANGED BUT NOT SAVED";
    trainable adapter tensors are listed as changed or not. Names are relative to the base model.

    Nothing big is copied: tensors under ``exact_below_bytes`` (1 MiB) are copied on their own device and
    compared bitwise; bigger ones are compared through a checksum computed on their own device (a random
    linear hash of their bytes modulo 2**31-1, two of them: a changed tensor goes unnoticed with probability
    about 2**-62, and the result does not depend on reduction order). Pass ``exact_below_bytes=float("inf")``
    to copy everything.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
        ...                        LoraConfig(target_modules=["0"], init_lora_weights=False))
        >>> _ = model.base_model.model[1].weight.requires_grad_(True)  # the accident
        >>> with audit(model) as report:
        ...     model(torch.ones(1, 4)).sum().backward()
        ...     torch.optim.SGD(model.parameters(), lr=0.1).step()
        >>> [e.name for e in report.base_changed]
        ['1.weight']
    """
    return Audit(model, adapter_name, exact_below_bytes)
