"""Canary, then fleet: an approved plan goes to one agent, is watched, then goes to the rest.

- Canary: ApplyPlan to one agent; REFUSED / FAILED / no answer stops the rollout (plan ->
  failed). Then a watch of `canary_s` seconds, cut short once `canary_requests` requests from
  the canary have been stored; a ROLLED_BACK from the canary meanwhile (its live quality
  guard) aborts the rollout (plan -> rolled_back, audit with the agent's cause).
- Fleet: every other connected agent of the fingerprint. An agent that refuses or fails is
  recorded and skipped: the executor applies atomically, so it still runs what it ran before.
- After the rollout, a quality-guard rollback on any agent rolls the plan back everywhere:
  one agent's breach is evidence against the plan, not against that agent.
- Applying a plan replaces whatever plan the agent ran; earlier applied plans of the same
  fingerprint become superseded.
- Plans go out signed (TrialClient.apply signs for PlanPurpose.APPLY). An agent's own
  unrequested ROLLED_BACK counts only from an agent the plan was sent to (any
  other is dropped and counted in `dropped_statuses`); a plan the process owner applied
  locally (detail "origin": "local", unsigned) is recorded as an audit NOTE "local_apply".
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from headroom_sidecar.controlplane.audit import AuditLog
from headroom_sidecar.controlplane.planner import TrialError
from headroom_sidecar.controlplane.plan_status import IllegalTransition
from headroom_sidecar.controlplane.plans import ApplicationState, PlanRecord, PlanStore, RolloutStage
from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.controlplane.trials import StatusReport, StatusState, TrialClient

log = logging.getLogger("headroom_sidecar.controlplane.rollout")

ROLLOUT_ACTOR = "rollout"
QUALITY_GUARD = "quality_guard"   # the agent's ROLLED_BACK detail "cause" for a live breach
LOCAL_ORIGIN = "local"            # the agent's APPLIED detail "origin" for handle.apply_plan


def _env(name: str) -> dict:
    return {"env": f"HEADROOM_ROLLOUT_{name}"}


@dataclass(frozen=True)
class RolloutSettings:
    # Canary watch: at most this long; 0 = no watch (straight to the fleet).
    canary_s: float = field(default=60.0, metadata=_env("CANARY_S"))
    # ... cut short once this many requests from the canary are stored (0 = watch canary_s).
    canary_requests: int = field(default=0, metadata=_env("CANARY_REQUESTS"))
    # How long an agent has to answer ApplyPlan / Rollback.
    apply_timeout_s: float = field(default=60.0, metadata=_env("APPLY_TIMEOUT_S"))
    poll_s: float = field(default=0.25, metadata=_env("POLL_S"))

    def __post_init__(self):
        bad = [f"{n}={getattr(self, n)} must be >= 0" for n in ("canary_s", "canary_requests")
               if getattr(self, n) < 0]
        bad += [f"{n}={getattr(self, n)} must be > 0" for n in ("apply_timeout_s", "poll_s")
                if getattr(self, n) <= 0]
        if bad:
            raise ValueError("invalid RolloutSettings: " + "; ".join(bad))

    @classmethod
    def resolve(cls, **overrides: Any) -> "RolloutSettings":
        return resolve_settings(cls, overrides, "rollout")


class Fleet:
    """Which agents run a fingerprint, what the model is, and what they served (the store)."""

    def __init__(self, store, state):
        self._store, self._state = store, state

    def agents(self, fingerprint: str) -> list[str]:
        """Connected agents holding the model, sorted by agent_id (the canary is the first)."""
        live = set(self._state.verified_agents())   # canaries: authenticated agents only
        with self._store.reader() as cur:
            rows = cur.execute("SELECT agent_id FROM agents WHERE fingerprint = ? "
                               "ORDER BY agent_id", [fingerprint]).fetchall()
        return [a for (a,) in rows if a in live]

    def agent(self, agent_id: str) -> Optional[dict]:
        with self._store.reader() as cur:
            cur.execute("SELECT * FROM agents WHERE agent_id = ?", [agent_id])
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return None if row is None else dict(zip(names, row))

    def model_facts(self, fingerprint: str) -> Optional[dict]:
        with self._store.reader() as cur:
            row = cur.execute("SELECT num_layers, num_heads, model_dtype FROM agents WHERE "
                              "fingerprint = ? ORDER BY last_seen DESC LIMIT 1",
                              [fingerprint]).fetchone()
        if row is None or not row[0] or not row[1]:
            return None
        return {"num_layers": int(row[0]), "num_heads": int(row[1]), "dtype": row[2] or "float32"}

    def model_placement(self, fingerprint: str) -> tuple[str, str]:
        """(weights' dtype, device: "cpu", "cuda:0") of the model as its latest agent's hello
        said; ("float32", "cpu") for what no agent reported."""
        with self._store.reader() as cur:
            row = cur.execute("SELECT model_dtype, model_device FROM agents WHERE fingerprint = ? "
                              "ORDER BY last_seen DESC LIMIT 1", [fingerprint]).fetchone()
        return (row and row[0]) or "float32", (row and row[1]) or "cpu"

    def requests_since(self, agent_id: str, since: datetime) -> int:
        with self._store.reader() as cur:
            return int(cur.execute("SELECT count(*) FROM requests WHERE agent_id = ? AND "
                                   "received_at >= ?", [agent_id, since]).fetchone()[0])


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)   # as the store's TIMESTAMP columns


@dataclass
class _Watch:
    """A canary under watch: set when the canary reports a rollback."""
    agent_id: str
    event: threading.Event = field(default_factory=threading.Event)
    report: Optional[StatusReport] = None


@dataclass(frozen=True)
class RolloutResult:
    plan_id: str
    status: PlanStatus
    applied: tuple[str, ...]
    failed: tuple[str, ...]
    message: str


class Rollout:
    def __init__(self, plans: PlanStore, audit: AuditLog, client: TrialClient, fleet: Fleet,
                 settings: Optional[RolloutSettings] = None):
        self.plans, self.audit, self.client, self.fleet = plans, audit, client, fleet
        self.settings = settings or RolloutSettings.resolve()
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}
        self.dropped_statuses = 0   # unrequested statuses from agents not running the plan
        client.subscribe(self._on_status)

    # ------------------------------------------------------------------ rollout
    def run(self, plan_id: str, actor: str = ROLLOUT_ACTOR) -> RolloutResult:
        """Canary then fleet for an approved plan; returns where it ended."""
        plan = self._require(plan_id, PlanStatus.APPROVED)
        agents = self.fleet.agents(plan.fingerprint)
        if not agents:
            raise ValueError(f"plan {plan_id}: no connected agent runs model "
                             f"{plan.fingerprint[:12]}; it stays approved")
        self.plans.transition(plan_id, PlanStatus.APPLYING, actor, f"canary {agents[0]}")
        canary = agents[0]
        watch = _Watch(canary)
        with self._lock:
            self._watches[plan_id] = watch
        try:
            if not self._apply_one(plan, canary, RolloutStage.CANARY, actor):
                return self._end(plan_id, PlanStatus.FAILED, actor, (), (canary,),
                                 f"canary {canary} did not apply the plan")
            if self._watch_canary(watch):
                return self._canary_rolled_back(plan_id, watch)
        finally:
            with self._lock:
                self._watches.pop(plan_id, None)
        return self._fleet(plan, canary, agents[1:], actor)

    def _fleet(self, plan: PlanRecord, canary: str, rest: list[str], actor: str) -> RolloutResult:
        applied, failed = [canary], []
        for agent_id in rest:
            (applied if self._apply_one(plan, agent_id, RolloutStage.FLEET, actor)
             else failed).append(agent_id)
        result = self._end(plan.plan_id, PlanStatus.APPLIED, actor, tuple(applied),
                           tuple(failed), f"applied on {len(applied)} agent(s), "
                           f"{len(failed)} failed")
        self._supersede_others(plan, actor)
        return result

    def _apply_one(self, plan: PlanRecord, agent_id: str, stage: RolloutStage, actor: str) -> bool:
        self.plans.record_application(plan.plan_id, agent_id, stage, ApplicationState.REQUESTED)
        self.audit.append(AuditKind.APPLY_REQUESTED, actor, plan.plan_id,
                          {"agent_id": agent_id, "stage": stage.value, "sha256": plan.sha256})
        try:
            report = self.client.apply(agent_id, plan.doc, self.settings.apply_timeout_s)
        except TrialError as e:
            report = StatusReport(agent_id, plan.plan_id, "", StatusState.FAILED, str(e), time.time())
        if report.state is StatusState.APPLIED:
            self.plans.record_application(plan.plan_id, agent_id, stage, ApplicationState.APPLIED,
                                          report.detail)
            self.audit.append(AuditKind.APPLIED, f"agent:{agent_id}", plan.plan_id,
                              {"stage": stage.value, "sha256": report.sha256,
                               "detail": report.detail})
            return True
        state = (ApplicationState.REFUSED if report.state is StatusState.REFUSED
                 else ApplicationState.FAILED)
        self.plans.record_application(plan.plan_id, agent_id, stage, state, report.detail)
        self.audit.append(AuditKind.APPLY_FAILED, f"agent:{agent_id}", plan.plan_id,
                          {"stage": stage.value, "state": state.value, "detail": report.detail})
        return False

    def _watch_canary(self, watch: _Watch) -> bool:
        """True if the canary rolled the plan back during the watch."""
        s, start, since = self.settings, time.monotonic(), _utc_now()
        while time.monotonic() - start < s.canary_s:
            if watch.event.wait(s.poll_s):
                return True
            if s.canary_requests and self.fleet.requests_since(watch.agent_id, since) >= \
                    s.canary_requests:
                break
        return watch.event.is_set()

    def _canary_rolled_back(self, plan_id: str, watch: _Watch) -> RolloutResult:
        report = watch.report
        cause = report.cause or "agent"
        self._record_rollback(plan_id, report, RolloutStage.CANARY)
        return self._end(plan_id, PlanStatus.ROLLED_BACK, f"agent:{report.agent_id}", (),
                         (report.agent_id,), f"canary {report.agent_id} rolled back ({cause}); "
                         "rollout aborted")

    def _end(self, plan_id: str, status: PlanStatus, actor: str, applied: tuple, failed: tuple,
             message: str) -> RolloutResult:
        self.plans.transition(plan_id, status, actor, message)
        return RolloutResult(plan_id, status, applied, failed, message)

    def _supersede_others(self, plan: PlanRecord, actor: str) -> None:
        for other in self.plans.list(status=PlanStatus.APPLIED, fingerprint=plan.fingerprint):
            # A class plan replaces only plans of its classes; a default plan replaces every
            # plan (agents drop class plans checked against the default it replaces).
            scoped = set(plan.query_classes)
            if other.plan_id != plan.plan_id and (not scoped or scoped & set(other.query_classes)):
                self.plans.transition(other.plan_id, PlanStatus.SUPERSEDED, actor,
                                      f"replaced by {plan.plan_id}")
                self.audit.append(AuditKind.SUPERSEDED, actor, other.plan_id,
                                  {"by": plan.plan_id})

    # ------------------------------------------------------------------ rollback
    def rollback(self, plan_id: str, actor: str, reason: str) -> RolloutResult:
        """Sends Rollback to every agent running the plan; the plan ends rolled_back."""
        self._require(plan_id, PlanStatus.APPLIED, PlanStatus.APPLYING)
        running = self.running_on(plan_id)
        self.audit.append(AuditKind.ROLLBACK_REQUESTED, actor, plan_id,
                          {"reason": reason, "agents": running})
        done, failed = [], []
        for agent_id, stage in running.items():
            report = self._rollback_one(plan_id, agent_id, reason)
            if report is not None and report.state is StatusState.ROLLED_BACK:
                self._record_rollback(plan_id, report, RolloutStage(stage))
                done.append(agent_id)
            else:
                failed.append(agent_id)
        return self._end(plan_id, PlanStatus.ROLLED_BACK, actor, tuple(done), tuple(failed),
                         f"{reason} (rolled back on {len(done)}, failed on {len(failed)})")

    def _rollback_one(self, plan_id: str, agent_id: str, reason: str) -> Optional[StatusReport]:
        try:
            return self.client.rollback(agent_id, plan_id, reason, self.settings.apply_timeout_s)
        except TrialError as e:
            self.audit.append(AuditKind.NOTE, ROLLOUT_ACTOR, plan_id,
                              {"event": "rollback_failed", "agent_id": agent_id, "error": str(e)})
            return None

    def _record_rollback(self, plan_id: str, report: StatusReport, stage: RolloutStage) -> None:
        self.plans.record_application(plan_id, report.agent_id, stage,
                                      ApplicationState.ROLLED_BACK, report.detail)
        self.audit.append(AuditKind.ROLLED_BACK, f"agent:{report.agent_id}", plan_id,
                          {"stage": stage.value, "cause": report.cause or "requested",
                           "detail": report.detail_json or report.detail})

    def _sent_to(self, plan_id: str) -> set[str]:
        """Agents the plan was sent to (any application record: requested onwards)."""
        return {app.agent_id for app in self.plans.applications(plan_id)}

    def running_on(self, plan_id: str) -> dict[str, str]:
        """agent_id -> rollout stage, for agents whose latest state for the plan is applied."""
        latest: dict[str, Any] = {}
        for app in self.plans.applications(plan_id):
            if app.state is not ApplicationState.REQUESTED:
                latest[app.agent_id] = app
        return {a: app.stage.value for a, app in sorted(latest.items())
                if app.state is ApplicationState.APPLIED}

    # ------------------------------------------------------------------ agents' own rollbacks
    def _on_status(self, report: StatusReport) -> None:
        """On a stream reader: a PlanStatus nobody waited for (the agent's quality guard)."""
        if report.state is StatusState.APPLIED and (report.detail_json or {}).get("origin") \
                == LOCAL_ORIGIN:
            self._record_local_apply(report)
            return
        if report.state is not StatusState.ROLLED_BACK:
            log.warning("unrequested %s for plan %s from %s: %s", report.state.value,
                        report.plan_id, report.agent_id, report.detail)
            return
        with self._lock:
            watch = self._watches.get(report.plan_id)
        if watch is not None and watch.agent_id == report.agent_id:
            watch.report = report
            watch.event.set()
            return
        # Rolling the others back waits for their answers, which arrive on stream readers:
        # never on this reader thread.
        threading.Thread(target=self._agent_rolled_back, args=(report,), daemon=True,
                         name=f"headroom-rollback-{report.plan_id}").start()

    def _record_local_apply(self, report: StatusReport) -> None:
        try:
            self.audit.append(AuditKind.NOTE, f"agent:{report.agent_id}", report.plan_id,
                              {"event": "local_apply", "sha256": report.sha256,
                               "detail": "applied by the process owner (handle.apply_plan), "
                                         "not signed by the control plane"})
        except Exception:   # on a stream reader: never cut the agent's stream
            log.exception("recording the local apply of %s on %s", report.plan_id,
                          report.agent_id)

    def _agent_rolled_back(self, report: StatusReport) -> None:
        """Recorded when the agent runs the plan; only a quality-guard breach rolls the plan
        back everywhere (a plan replaced by the next one, or dropped by a trial, says nothing
        against it). From an agent the plan never reached it is dropped: one agent must not
        roll back the fleet's plan by claiming a breach."""
        try:
            plan = self.plans.get(report.plan_id)
            if plan is None:
                return
            if report.agent_id not in self._sent_to(report.plan_id):
                self.dropped_statuses += 1
                log.warning("dropped ROLLED_BACK of plan %s from agent %s: never sent to it",
                            report.plan_id, report.agent_id)
                return
            stage = self.running_on(report.plan_id).get(report.agent_id, RolloutStage.FLEET.value)
            self._record_rollback(report.plan_id, report, RolloutStage(stage))
            if plan.status is PlanStatus.APPLIED and report.cause == QUALITY_GUARD:
                self.rollback(report.plan_id, f"agent:{report.agent_id}",
                              f"quality guard tripped on {report.agent_id}: rolling back "
                              "everywhere")
        except (IllegalTransition, KeyError, ValueError):
            log.exception("handling the rollback of %s on %s", report.plan_id, report.agent_id)

    def _require(self, plan_id: str, *statuses: PlanStatus) -> PlanRecord:
        plan = self.plans.get(plan_id)
        if plan is None:
            raise KeyError(f"no plan {plan_id!r}")
        if plan.status not in statuses:
            raise IllegalTransition(f"plan {plan_id} is {plan.status.value}; this needs "
                                    f"{' or '.join(s.value for s in statuses)}")
        return plan
