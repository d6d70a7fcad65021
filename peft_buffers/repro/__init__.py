"""Reproducibility toolkit: audit what training changed, check that a reload reproduces the model, and
explain what makes outputs mode- or run-dependent.

Example:
    >>> import peft_buffers
    >>> callable(peft_buffers.audit), callable(peft_buffers.check_reload), callable(peft_buffers.explain)
    (True, True, True)
"""

from ._audit import Audit, AuditEntry, AuditReport, audit
from ._check_reload import ReloadReport, check_reload
from ._explain import Explanation, Finding, explain
from ._reload_causes import Cause

__all__ = [
    "Audit",
    "AuditEntry",
    "AuditReport",
    "Cause",
    "Explanation",
    "Finding",
    "ReloadReport",
    "audit",
    "check_reload",
    "explain",
]
