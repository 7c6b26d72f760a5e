"""The plan store: plans, their status history, trials, policy decisions and applications.

What a plan document means is the contract's (proto/plan.py); which status moves are allowed
is controlplane/plan_status.py; a plan's readable diff is controlplane/plan_diff.py.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from headroom_sidecar.controlplane.plan_status import check_transition
from headroom_sidecar.controlplane.policy.types import Outcome
from headroom_sidecar.controlplane.schema import PLAN_TABLES_DDL
from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.proto.plan import Plan, PlanMode, canonical_json, parse_plan


class RolloutStage(str, enum.Enum):
    CANARY = "canary"
    FLEET = "fleet"


class ApplicationState(str, enum.Enum):
    REQUESTED = "requested"
    APPLIED = "applied"
    FAILED = "failed"
    REFUSED = "refused"       # did not fit the agent's model; nothing touched
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class PlanRecord:
    plan_id: str
    version: int
    sha256: str
    fingerprint: str
    query_classes: tuple[str, ...]
    mode: PlanMode
    doc: dict
    status: PlanStatus
    proposed_by: str
    created_at_us: int
    updated_at_us: int

    @property
    def plan(self) -> Plan:
        return parse_plan(self.doc)


@dataclass(frozen=True)
class Transition:
    plan_id: str
    ts_us: int
    from_status: Optional[PlanStatus]
    to_status: PlanStatus
    actor: str
    reason: str


@dataclass(frozen=True)
class Trial:
    trial_id: str
    plan_id: str
    agent_id: str
    evidence: Optional[dict]
    requested_at_us: int
    finished_at_us: Optional[int]
    error: Optional[str]


@dataclass(frozen=True)
class Decision:
    plan_id: str
    outcome: Outcome
    rules: list                 # every rule's outcome, measured value, threshold
    policy_revision: str
    policy_hash: str
    actor: str
    reason: str
    decided_at_us: int = 0      # 0: the store stamps it


@dataclass(frozen=True)
class Application:
    plan_id: str
    agent_id: str
    stage: RolloutStage
    state: ApplicationState
    detail: str
    ts_us: int


@dataclass(frozen=True)
class PlanHistory:
    plan: PlanRecord
    transitions: list[Transition]
    trials: list[Trial]
    decisions: list[Decision]
    applications: list[Application]


def ensure_schema(con) -> None:
    # The tables are schema.py's (one owner, under the schema version); run here for a bare
    # connection.
    con.execute(PLAN_TABLES_DDL)


def _now_us() -> int:
    return time.time_ns() // 1000


_PLAN_COLUMNS = ("plan_id, version, sha256, fingerprint, query_classes, mode, doc_json, status, "
                 "proposed_by, created_at_us, updated_at_us")


class PlanStore:
    """Plans, their status history, trials, policy decisions and applications, in DuckDB.

    A plan's document is immutable (its id names one hash; a revision is a new plan_id with a
    higher `version`); only its status moves, along plan_status.TRANSITIONS, and every move is kept in
    plan_transitions. Everything that uses `con` must share `lock`; do not call these methods
    inside a transaction opened on `con` (they open their own). Timestamps: wall clock, µs.
    """

    def __init__(self, con, lock: Optional[threading.Lock] = None):
        self._con = con
        self._lock = lock if lock is not None else threading.RLock()
        with self._lock:
            ensure_schema(con)

    # ------------------------------------------------------------ plans
    def add(self, plan: Union[Plan, Mapping[str, Any]], actor: str,
            reason: str = "proposed") -> PlanRecord:
        """Store a new plan as proposed (its normal form). Re-adding the same plan is a no-op."""
        plan = plan if isinstance(plan, Plan) else parse_plan(plan)
        doc, now = plan.to_doc(), _now_us()
        with self._lock:
            existing = self._get(plan.plan_id)
            if existing is not None:
                if existing.sha256 != plan.sha256:
                    raise ValueError(f"plan {plan.plan_id!r} exists with a different document "
                                     f"(sha256 {existing.sha256[:12]}); give the new one a new plan_id")
                return existing
            self._in_transaction(
                ("INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [plan.plan_id, plan.version, plan.sha256, plan.model_fingerprint,
                  list(plan.query_classes), plan.mode.value, canonical_json(doc).decode(),
                  PlanStatus.PROPOSED.value, actor, now, now]),
                ("INSERT INTO plan_transitions VALUES (?, ?, NULL, ?, ?, ?)",
                 [plan.plan_id, now, PlanStatus.PROPOSED.value, actor, reason]))
            return self._get(plan.plan_id)

    def get(self, plan_id: str) -> Optional[PlanRecord]:
        with self._lock:
            return self._get(plan_id)

    def _get(self, plan_id: str) -> Optional[PlanRecord]:
        r = self._con.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE plan_id = ?",
                              [plan_id]).fetchone()
        return None if r is None else _plan_record(r)

    def list(self, status: Optional[PlanStatus] = None, fingerprint: Optional[str] = None,
             query_class: Optional[str] = None, limit: int = 100) -> list[PlanRecord]:
        """Newest first. A plan with no query classes applies to every class and always matches."""
        clauses, params = [], []
        if status is not None:
            clauses.append("status = ?")
            params.append(PlanStatus(status).value)
        if fingerprint is not None:
            clauses.append("fingerprint = ?")
            params.append(fingerprint)
        if query_class is not None:
            clauses.append("(len(query_classes) = 0 OR list_contains(query_classes, ?))")
            params.append(query_class)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            rows = self._con.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans {where} "
                f"ORDER BY created_at_us DESC, plan_id DESC LIMIT ?", params + [limit]).fetchall()
        return [_plan_record(r) for r in rows]

    def transition(self, plan_id: str, to: PlanStatus, actor: str, reason: str) -> PlanRecord:
        to = PlanStatus(to)
        with self._lock:
            current = self._require(plan_id)
            check_transition(plan_id, current.status, to)
            now = _now_us()
            self._in_transaction(
                ("UPDATE plans SET status = ?, updated_at_us = ? WHERE plan_id = ?",
                 [to.value, now, plan_id]),
                ("INSERT INTO plan_transitions VALUES (?, ?, ?, ?, ?, ?)",
                 [plan_id, now, current.status.value, to.value, actor, reason]))
            return self._get(plan_id)

    # ------------------------------------------------------------ trials
    def start_trial(self, plan_id: str, agent_id: str, trial_id: Optional[str] = None) -> str:
        trial_id = trial_id or f"trial-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self._require(plan_id)
            self._con.execute("INSERT INTO trials VALUES (?, ?, ?, NULL, ?, NULL, NULL)",
                              [trial_id, plan_id, agent_id, _now_us()])
        return trial_id

    def finish_trial(self, trial_id: str, evidence: Optional[dict] = None,
                     error: Optional[str] = None) -> Trial:
        if (evidence is None) == (error is None):
            raise ValueError("finish_trial takes exactly one of evidence or error")
        ev = None if evidence is None else json.dumps(evidence, sort_keys=True, allow_nan=False)
        with self._lock:
            done = self._con.execute("SELECT finished_at_us FROM trials WHERE trial_id = ?",
                                     [trial_id]).fetchone()
            if done is None:
                raise KeyError(f"no trial {trial_id!r}")
            if done[0] is not None:
                raise ValueError(f"trial {trial_id!r} already finished")
            self._con.execute("UPDATE trials SET evidence_json = ?, finished_at_us = ?, error = ? "
                              "WHERE trial_id = ?", [ev, _now_us(), error, trial_id])
            return self._trials("trial_id = ?", trial_id)[0]

    def trials(self, plan_id: str) -> list[Trial]:
        with self._lock:
            return self._trials("plan_id = ?", plan_id)

    def _trials(self, where: str, value: str) -> list[Trial]:
        rows = self._con.execute(
            "SELECT trial_id, plan_id, agent_id, evidence_json, requested_at_us, finished_at_us, "
            f"error FROM trials WHERE {where} ORDER BY requested_at_us, trial_id", [value]).fetchall()
        return [Trial(r[0], r[1], r[2], None if r[3] is None else json.loads(r[3]), r[4], r[5], r[6])
                for r in rows]

    # ------------------------------------------------------------ decisions, applications
    def record_decision(self, d: Decision) -> Decision:
        outcome = Outcome(d.outcome)
        at = d.decided_at_us or _now_us()
        with self._lock:
            self._require(d.plan_id)
            self._con.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              [d.plan_id, outcome.value, json.dumps(d.rules, sort_keys=True),
                               d.policy_revision, d.policy_hash, at, d.actor, d.reason])
        return dataclasses.replace(d, outcome=outcome, decided_at_us=at)

    def decisions(self, plan_id: str) -> list[Decision]:
        with self._lock:
            return self._decisions(plan_id)

    def _decisions(self, plan_id: str) -> list[Decision]:
        rows = self._con.execute(
            "SELECT plan_id, outcome, rules_json, policy_revision, policy_hash, actor, reason, "
            "decided_at_us FROM decisions WHERE plan_id = ? ORDER BY decided_at_us",
            [plan_id]).fetchall()
        return [Decision(r[0], Outcome(r[1]), json.loads(r[2]), *r[3:]) for r in rows]

    def record_application(self, plan_id: str, agent_id: str, stage: RolloutStage,
                           state: ApplicationState, detail: str = "") -> Application:
        app = Application(plan_id, agent_id, RolloutStage(stage), ApplicationState(state),
                          detail, _now_us())
        with self._lock:
            self._require(plan_id)
            self._con.execute("INSERT INTO applications VALUES (?, ?, ?, ?, ?, ?)",
                              [plan_id, agent_id, app.stage.value, app.state.value, detail, app.ts_us])
        return app

    def applications(self, plan_id: str) -> list[Application]:
        with self._lock:
            return self._applications(plan_id)

    def _applications(self, plan_id: str) -> list[Application]:
        rows = self._con.execute(
            "SELECT plan_id, agent_id, stage, state, detail, ts_us FROM applications "
            "WHERE plan_id = ? ORDER BY ts_us", [plan_id]).fetchall()
        return [Application(r[0], r[1], RolloutStage(r[2]), ApplicationState(r[3]), r[4], r[5])
                for r in rows]

    def history(self, plan_id: str) -> PlanHistory:
        with self._lock:
            plan = self._require(plan_id)
            rows = self._con.execute(
                "SELECT plan_id, ts_us, from_status, to_status, actor, reason FROM plan_transitions "
                "WHERE plan_id = ? ORDER BY ts_us, rowid", [plan_id]).fetchall()
            moves = [Transition(r[0], r[1], None if r[2] is None else PlanStatus(r[2]),
                                PlanStatus(r[3]), r[4], r[5]) for r in rows]
            return PlanHistory(plan, moves, self._trials("plan_id = ?", plan_id),
                               self._decisions(plan_id), self._applications(plan_id))

    # ------------------------------------------------------------ helpers
    def _require(self, plan_id: str) -> PlanRecord:
        """Callers hold the lock (it may be a plain Lock: never taken twice)."""
        plan = self._get(plan_id)
        if plan is None:
            raise KeyError(f"no plan {plan_id!r}")
        return plan

    def _in_transaction(self, *statements: tuple[str, list]) -> None:
        self._con.execute("BEGIN TRANSACTION")
        try:
            for sql, params in statements:
                self._con.execute(sql, params)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise


def _plan_record(r: tuple) -> PlanRecord:
    return PlanRecord(r[0], int(r[1]), r[2], r[3], tuple(r[4]), PlanMode(r[5]), json.loads(r[6]),
                      PlanStatus(r[7]), r[8], int(r[9]), int(r[10]))
