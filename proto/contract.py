"""Names the parts share beyond the wire messages: a plan's status and the audit log's kinds.

The control plane writes them (its store, its audit log); the dashboard reads them back from
the same tables; the strings are stored, so a value never changes meaning.
"""
from __future__ import annotations

import enum


class PlanStatus(str, enum.Enum):
    """Where a plan stands; controlplane/plan_status.py holds the moves between them."""
    PROPOSED = "proposed"
    TRIALLED = "trialled"
    APPROVED = "approved"
    REJECTED = "rejected"
    NEEDS_HUMAN = "needs_human"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"


class AuditKind(str, enum.Enum):
    """What an audit row records (column `kind` of the hash-chained audit log)."""
    PROPOSED = "PROPOSED"
    TRIAL_REQUESTED = "TRIAL_REQUESTED"
    TRIAL_RESULT = "TRIAL_RESULT"
    POLICY_EVALUATED = "POLICY_EVALUATED"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    NEEDS_HUMAN = "NEEDS_HUMAN"
    APPLY_REQUESTED = "APPLY_REQUESTED"
    APPLIED = "APPLIED"
    APPLY_FAILED = "APPLY_FAILED"
    ROLLBACK_REQUESTED = "ROLLBACK_REQUESTED"
    ROLLED_BACK = "ROLLED_BACK"
    SUPERSEDED = "SUPERSEDED"
    POLICY_RELOADED = "POLICY_RELOADED"
    AGENT_CONNECTED = "AGENT_CONNECTED"
    AGENT_DISCONNECTED = "AGENT_DISCONNECTED"
    NOTE = "NOTE"
