"""The control plane's records as Admin reply messages (proto/headroom.proto), one function each.

Status words travel as the strings the store keeps (enum .value); opaque documents (plan body,
evidence, rule results, audit details) as canonical JSON with NaN written as null.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime
from typing import Any, Optional

from headroom_sidecar.proto import headroom_pb2 as pb


def jsonable(value: Any) -> Any:
    """value with dataclasses as dicts, str enums as their values, NaN as None, datetimes ISO."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):   # str enums
        return value.value
    return value


def document(value: Any) -> str:
    """An opaque document field: canonical JSON; None -> ""."""
    return "" if value is None else json.dumps(jsonable(value), sort_keys=True, allow_nan=False)


def _value(enum_or_str: Any) -> Optional[str]:
    return None if enum_or_str is None else getattr(enum_or_str, "value", enum_or_str)


def from_dataclass(message_cls, obj: Any):
    """message_cls(**fields of obj), None fields left unset: for records whose field names
    are the message's (analysis rows, jobs)."""
    return message_cls(**{k: v for k, v in jsonable(obj).items() if v is not None})


def plan_record(record) -> pb.PlanRecord:
    return pb.PlanRecord(
        plan_id=record.plan_id, version=record.version, status=_value(record.status),
        fingerprint=record.fingerprint, query_classes=list(record.query_classes),
        sha256=record.sha256, mode=_value(record.mode), proposed_by=record.proposed_by,
        notes=str(record.doc.get("notes", "")), created_at_us=record.created_at_us,
        updated_at_us=record.updated_at_us)


def trial(t) -> pb.PlanTrial:
    return pb.PlanTrial(trial_id=t.trial_id, plan_id=t.plan_id, agent_id=t.agent_id,
                        evidence_json=document(t.evidence), requested_at_us=t.requested_at_us,
                        finished_at_us=t.finished_at_us, error=t.error)


def decision(d) -> pb.PlanDecision:
    return pb.PlanDecision(plan_id=d.plan_id, outcome=_value(d.outcome), rules_json=document(d.rules),
                           policy_revision=d.policy_revision, policy_hash=d.policy_hash,
                           actor=d.actor, reason=d.reason, decided_at_us=d.decided_at_us)


def application(a) -> pb.PlanApplication:
    return pb.PlanApplication(plan_id=a.plan_id, agent_id=a.agent_id, stage=_value(a.stage),
                              state=_value(a.state), detail=a.detail, ts_us=a.ts_us)


def transition(t) -> pb.PlanTransition:
    return pb.PlanTransition(plan_id=t.plan_id, ts_us=t.ts_us, from_status=_value(t.from_status),
                             to_status=_value(t.to_status), actor=t.actor, reason=t.reason)


def show_plan(history, diff: list[str], running_on: dict[str, str]) -> pb.ShowPlanReply:
    return pb.ShowPlanReply(
        plan=plan_record(history.plan), doc_json=document(history.plan.doc), diff=diff,
        trials=[trial(t) for t in history.trials],
        decisions=[decision(d) for d in history.decisions],
        applications=[application(a) for a in history.applications],
        history=[transition(t) for t in history.transitions], running_on=running_on)


def audit_row(r) -> pb.AuditRow:
    return pb.AuditRow(seq=r.seq, ts_us=r.ts_us, kind=_value(r.kind), actor=r.actor,
                       subject=r.subject, details_json=document(r.details),
                       prev_hash=r.prev_hash, row_hash=r.row_hash, mac=r.mac)


def anchor(head) -> pb.AuditAnchor:
    return pb.AuditAnchor(seq=head.seq, row_hash=head.row_hash, mac=head.mac,
                          keyed_since=head.keyed_since)


def verify(result, head) -> pb.VerifyAuditReply:
    return pb.VerifyAuditReply(ok=result.ok, rows_checked=result.rows_checked,
                               first_bad_seq=result.first_bad_seq, reason=result.reason,
                               unkeyed_before_seq=result.unkeyed_before_seq, head=anchor(head))


def policy_set(shown: dict) -> pb.PolicySet:
    """Policies.show()'s dict: folder, loaded, problems, and when loaded revision/files/rules."""
    revision = shown.get("revision")
    return pb.PolicySet(
        folder=str(shown["folder"]), loaded=shown["loaded"], problems=shown["problems"],
        revision=pb.PolicyRevision(**revision) if revision else None,
        files=shown.get("files", []), rules=[pb.PolicyRule(**r) for r in shown.get("rules", [])])


def rollback(result) -> pb.RollbackPlanReply:
    return pb.RollbackPlanReply(plan_id=result.plan_id, status=_value(result.status),
                                applied=list(result.applied), failed=list(result.failed),
                                message=result.message)
