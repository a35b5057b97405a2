"""Constraint audits: one-sided confidence bounds per constraint, slices, teacher weights, traces, provenance.

    >>> report = safekd.audit(student, heldout, spec, confidence=0.95)
    >>> report.passed, write_report(report, "out/")
"""
from safekd.auditing.bounds import Bound, betting, bootstrap, clopper_pearson, empirical_bernstein
from safekd.auditing.core import audit
from safekd.auditing.monitor import ConfidenceSequence, ConstraintMonitor, MonitorStatus
from safekd.auditing.planning import AuditPlan, max_expected_rate, pass_probability, plan_audit
from safekd.auditing.render import to_html, to_markdown, write_report
from safekd.auditing.report import (
    SCHEMA_VERSION,
    AuditReport,
    ConstraintResult,
    SliceResult,
    TeacherWeightSummary,
    load_schema,
    validate_report_dict,
)

__all__ = [
    "SCHEMA_VERSION",
    "AuditPlan",
    "AuditReport",
    "ConfidenceSequence",
    "ConstraintMonitor",
    "MonitorStatus",
    "max_expected_rate",
    "pass_probability",
    "plan_audit",
    "Bound",
    "betting",
    "ConstraintResult",
    "SliceResult",
    "TeacherWeightSummary",
    "audit",
    "bootstrap",
    "clopper_pearson",
    "empirical_bernstein",
    "load_schema",
    "to_html",
    "to_markdown",
    "validate_report_dict",
    "write_report",
]
