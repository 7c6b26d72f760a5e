"""Rollouts a control plane was killed in, settled from what the agents say when they reconnect.

At start no rollout thread exists, so every plan still `applying` was left by a process that
died mid-rollout. Each agent the plan was sent to says in its hello which plan it runs
(AgentHello.active_plan_id / active_plan_hash, and class_plans for plans scoped to query
classes); the first hello after the restart settles it:
- it runs the plan: its application becomes applied (if that was not recorded yet);
- it does not: requested -> failed, applied -> rolled_back, with RESTART_REASON.
The canary's answer settles the plan as the rollout would have: running -> applied (earlier
applied plans of the model superseded), not running -> failed (it never ran there: the
approval holds, a later rollout may apply it) or rolled_back (it ran and no longer does).
A plan sent to no agent fails at once; one whose canary does not reconnect within timeout_s
fails then. Every step is in the audit log.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from headroom_sidecar.controlplane.audit import AuditLog
from headroom_sidecar.controlplane.jobs import JobStore
from headroom_sidecar.controlplane.plans import (Application, ApplicationState, PlanRecord, PlanStore,
                                                 RolloutStage)
from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.proto import headroom_pb2 as pb

log = logging.getLogger("headroom_sidecar.controlplane.recovery")

RESTART_REASON = "control plane restarted mid-rollout"
RECOVERY_ACTOR = "recovery"
_A = ApplicationState


@dataclass
class _Orphan:
    """A plan left applying: the agents it was sent to and their last recorded state."""
    plan: PlanRecord
    canary: str
    latest: dict[str, Application]
    heard: set[str] = field(default_factory=set)   # agents whose hello settled them
    settled: bool = False


def _orphan(plan: PlanRecord, apps: list[Application]) -> _Orphan:
    latest = {app.agent_id: app for app in apps}            # apps are in time order
    canary = next((a.agent_id for a in apps if a.stage is RolloutStage.CANARY), apps[0].agent_id)
    return _Orphan(plan, canary, latest)


def _runs(hello: pb.AgentHello, plan: PlanRecord) -> tuple[bool, str]:
    """Whether the agent runs `plan` (as its default, or for its query classes), and what it
    said, for the records."""
    ours = (plan.plan_id, plan.sha256)
    runs = (hello.active_plan_id, hello.active_plan_hash) == ours or any(
        (c.plan_id, c.plan_hash) == ours for c in hello.class_plans)
    says = f"the agent reports it runs {hello.active_plan_id or 'no plan'}"
    if hello.class_plans:
        says += " by default; for query classes: " + ", ".join(
            f"{c.query_class}: {c.plan_id}" for c in hello.class_plans)
    return runs, says


class RolloutRecovery:
    def __init__(self, plans: PlanStore, audit: AuditLog, jobs: JobStore, supersede,
                 timeout_s: float):
        """supersede(plan, actor): what a finished rollout does to the model's older plans."""
        self.plans, self.audit, self.jobs = plans, audit, jobs
        self._supersede, self.timeout_s = supersede, timeout_s
        self._lock = threading.RLock()   # one hello at a time; taken before the store's lock
        self._orphans: dict[str, _Orphan] = {}
        self._closed = threading.Event()

    def start(self) -> list[str]:
        """Finds the plans left applying (settles those sent to nobody); returns those pending."""
        with self._lock:
            for plan in self.plans.list(status=PlanStatus.APPLYING, limit=1_000_000):
                apps = self.plans.applications(plan.plan_id)
                if not apps:
                    self._settle_plan(plan.plan_id, PlanStatus.FAILED,
                                      f"{RESTART_REASON}; it had been sent to no agent")
                    continue
                self._orphans[plan.plan_id] = _orphan(plan, apps)
            pending = sorted(self._orphans)
        if pending:
            log.warning("plans left applying by a previous process: %s; settled as their "
                        "agents reconnect (at most %g s)", ", ".join(pending), self.timeout_s)
            threading.Thread(target=self._expire, daemon=True,
                             name="headroom-rollout-recovery").start()
        return pending

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(p for p, o in self._orphans.items() if not o.settled)

    def close(self) -> None:
        self._closed.set()

    # ------------------------------------------------------------------ agents reconnecting
    def on_hello(self, agent_id: str, hello: pb.AgentHello) -> None:
        """On the agent's stream reader, right after it registered."""
        with self._lock:
            for orphan in list(self._orphans.values()):
                if agent_id in orphan.latest and agent_id not in orphan.heard:
                    try:
                        self._settle_agent(orphan, agent_id, hello)
                    except Exception:   # never cut the agent's stream over this
                        log.exception("settling plan %s on agent %s", orphan.plan.plan_id,
                                      agent_id)

    def _settle_agent(self, orphan: _Orphan, agent_id: str, hello: pb.AgentHello) -> None:
        plan, last = orphan.plan, orphan.latest[agent_id]
        runs, says = _runs(hello, plan)
        if runs and last.state is not _A.APPLIED:
            self._record(plan, last, _A.APPLIED, AuditKind.APPLIED, says)
        elif not runs and last.state is _A.APPLIED:
            self._record(plan, last, _A.ROLLED_BACK, AuditKind.ROLLED_BACK, says)
        elif not runs and last.state is _A.REQUESTED:
            self._record(plan, last, _A.FAILED, AuditKind.APPLY_FAILED, says)
        orphan.heard.add(agent_id)
        if agent_id == orphan.canary and not orphan.settled:
            ran = last.state in (_A.APPLIED, _A.ROLLED_BACK)
            status = PlanStatus.APPLIED if runs else \
                PlanStatus.ROLLED_BACK if ran else PlanStatus.FAILED
            self._settle_plan(plan.plan_id, status, f"{RESTART_REASON}; canary {agent_id}: {says}")
            orphan.settled = True

    def _record(self, plan: PlanRecord, last: Application, state: ApplicationState,
                kind: AuditKind, says: str) -> None:
        detail = f"{RESTART_REASON}; {says}"
        self.plans.record_application(plan.plan_id, last.agent_id, last.stage, state, detail)
        self.audit.append(kind, f"agent:{last.agent_id}", plan.plan_id,
                          {"stage": last.stage.value, "state": state.value, "sha256": plan.sha256,
                           "detail": detail, "reconciled": True})

    # ------------------------------------------------------------------ the plan
    def _settle_plan(self, plan_id: str, status: PlanStatus, reason: str) -> None:
        plan = self.plans.get(plan_id)
        if plan is None or plan.status is not PlanStatus.APPLYING:
            return   # an operator settled it meanwhile (plan.rollback works on applying)
        self.plans.transition(plan_id, status, RECOVERY_ACTOR, reason)
        self.audit.append(AuditKind.NOTE, RECOVERY_ACTOR, plan_id,
                          {"event": "rollout_reconciled", "status": status.value,
                           "reason": reason})
        if status is PlanStatus.APPLIED:
            self._supersede(plan, RECOVERY_ACTOR)
        self.jobs.set_plan_status(plan_id, status.value)
        log.warning("plan %s: %s (%s)", plan_id, status.value, reason)

    def _expire(self) -> None:
        """After timeout_s, a plan whose canary never reconnected fails: nobody can say it runs."""
        if self._closed.wait(self.timeout_s):
            return
        with self._lock:
            for orphan in self._orphans.values():
                if orphan.settled:
                    continue
                try:
                    self._settle_plan(orphan.plan.plan_id, PlanStatus.FAILED,
                                      f"{RESTART_REASON}; canary {orphan.canary} did not "
                                      f"reconnect within {self.timeout_s:g} s")
                except Exception:   # the store may be closing
                    log.exception("settling plan %s after the timeout", orphan.plan.plan_id)
                orphan.settled = True
            self._orphans.clear()

