"""Writes the planner's trail to the plan store and the audit log, as it happens.

Per hypothesis: plan stored (proposed) + PROPOSED, trial row + TRIAL_REQUESTED before the trial;
trial finished + TRIAL_RESULT after it, then the plan moves to trialled, and on to rejected
(dropped) or stays trialled (kept). When the search is over, `settle(best)` supersedes every
kept plan but the best: the objective chooses among all kept plans, so the best can be an
earlier one (a later change that fit the budget but ran slower), and it must still be
approvable.
"""
from __future__ import annotations

from typing import Optional

from headroom_sidecar.controlplane.audit import AuditLog
from headroom_sidecar.controlplane.plans import PlanStore
from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.controlplane.planner.search import TrialRecord
from headroom_sidecar.controlplane.admin_replies import jsonable


class StoreRecorder:
    """Pass `propose=rec.propose, record=rec.record` to Planner."""

    def __init__(self, plans: PlanStore, audit: AuditLog, agent_id: str, actor: str = "planner"):
        self._plans, self._audit = plans, audit
        self._agent_id, self._actor = agent_id, actor
        self._trial_ids: dict[str, str] = {}
        self._kept: list[str] = []

    def propose(self, doc: dict) -> None:
        plan_id = doc["plan_id"]
        rec = self._plans.add(doc, self._actor, reason=doc.get("notes", ""))
        self._audit.append(AuditKind.PROPOSED, self._actor, plan_id,
                           {"sha256": rec.sha256, "notes": doc.get("notes", "")})
        trial_id = self._plans.start_trial(plan_id, self._agent_id, trial_id=f"{plan_id}.trial")
        self._trial_ids[plan_id] = trial_id
        self._audit.append(AuditKind.TRIAL_REQUESTED, self._actor, plan_id,
                           {"trial_id": trial_id, "agent_id": self._agent_id})

    def record(self, rec: TrialRecord) -> None:
        plan_id = rec.plan["plan_id"]
        if plan_id not in self._trial_ids:   # Planner ran without propose=: store it now
            self.propose(rec.plan)
        trial_id = self._trial_ids.pop(plan_id)
        evidence = None if rec.evidence is None else jsonable(rec.evidence)
        error = None if evidence is not None else rec.reason
        self._plans.finish_trial(trial_id, evidence=evidence, error=error)
        self._audit.append(AuditKind.TRIAL_RESULT, f"agent:{self._agent_id}", plan_id,
                           {"trial_id": trial_id, "phase": rec.phase.value, "change": rec.change,
                            "evidence": evidence, "kept": rec.kept, "reason": rec.reason})
        self._plans.transition(plan_id, PlanStatus.TRIALLED, self._actor, rec.reason)
        if rec.kept:
            self._kept.append(plan_id)
        else:
            self._plans.transition(plan_id, PlanStatus.REJECTED, self._actor, rec.reason)
            self._audit.append(AuditKind.REJECTED, self._actor, plan_id, {"reason": rec.reason})

    def settle(self, best_plan_id: Optional[str]) -> None:
        """Every kept plan but `best_plan_id` (None: the search kept none) is superseded by it."""
        for plan_id in self._kept:
            if plan_id == best_plan_id:
                continue
            why = f"superseded by {best_plan_id}"
            self._plans.transition(plan_id, PlanStatus.SUPERSEDED, self._actor, why)
            self._audit.append(AuditKind.SUPERSEDED, self._actor, plan_id, {"by": best_plan_id})
        self._kept = []
