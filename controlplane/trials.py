"""Requests to one connected agent that wait for its answer: trials, applies, rollbacks.

Each request goes out on the agent's Connect stream (ServerState.send_to_agent) and waits on
a future that the stream's reader completes when the answer arrives (TRIAL_RESULT keyed by
trial_id, PLAN_STATUS keyed by agent and plan). A waiter also gives up when the agent's
stream ends, so a crashed agent costs a poll interval, not the whole timeout.
PLAN_STATUS messages nobody waits for (the agent's own quality-guard rollback) go to the
subscribers registered with `subscribe`.

Every plan sent is signed (controlplane/signing.py): ApplyPlan for PlanPurpose.APPLY, a
trial's plan for PlanPurpose.TRIAL, so a trial's candidate can never be replayed as an apply.

Answers are bound to the agent asked: a TrialResult is accepted only from the agent the trial
went to, for a trial id this client issued (random suffix: not guessable), and only once; a
PlanStatus completes a request only when it comes from the agent the request went to. Anything
else is dropped and counted in `TrialClient.dropped` (DropReason -> count).
"""
from __future__ import annotations

import enum
import json
import collections
import dataclasses
import logging
import secrets
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from headroom_sidecar.controlplane.inbound import InboundKind
from headroom_sidecar.controlplane.planner import TrialError
from headroom_sidecar.proto.plan import Plan, canonical_json
from headroom_sidecar.controlplane.signing import PlanSigner
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.evidence import EvidenceError, parse_evidence_doc
from headroom_sidecar.proto.plandoc import PlanPurpose

log = logging.getLogger("headroom_sidecar.controlplane.trials")

_POLL_S = 0.2   # how often a waiter checks that its agent is still connected
_ANSWERED_MAX = 4096   # trial ids remembered after their answer, to tell duplicates apart


class DropReason(str, enum.Enum):
    """Why an agent's answer was not accepted."""
    UNKNOWN_TRIAL = "unknown_trial"    # no trial with that id is waiting (made up, timed out)
    WRONG_AGENT = "wrong_agent"        # the trial went to another agent
    DUPLICATE = "duplicate"            # that trial was already answered


class StatusState(str, enum.Enum):
    """pb.PlanStatus.State as this package spells it."""
    APPLIED = "applied"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    UNSPECIFIED = "unspecified"


_STATE_OF = {pb.PlanStatus.APPLIED: StatusState.APPLIED, pb.PlanStatus.FAILED: StatusState.FAILED,
             pb.PlanStatus.ROLLED_BACK: StatusState.ROLLED_BACK,
             pb.PlanStatus.REFUSED: StatusState.REFUSED}


@dataclass(frozen=True)
class StatusReport:
    """One PlanStatus from one agent, as plain data; `detail` is parsed when it is a JSON object."""
    agent_id: str
    plan_id: str
    sha256: str
    state: StatusState
    detail: str
    received_at_s: float

    @property
    def cause(self) -> str:
        """detail's "cause" (e.g. quality_guard), or "" when detail is not a JSON object."""
        parsed = self.detail_json
        return str(parsed.get("cause", "")) if parsed else ""

    @property
    def detail_json(self) -> Optional[dict]:
        try:
            parsed = json.loads(self.detail) if self.detail else None
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None


class AgentGone(TrialError):
    """The agent is not connected, its queue is full, or its stream ended while we waited."""


StatusCallback = Callable[[StatusReport], None]


def plan_message(doc: Mapping[str, Any]) -> pb.Plan:
    """A plan as it travels: its canonical JSON and that JSON's sha256 (both sides hash the same bytes)."""
    plan = Plan.from_doc(doc)
    return pb.Plan(plan_id=plan.plan_id, version=plan.version,
                   document_json=canonical_json(plan.to_doc()).decode(), sha256=plan.sha256)


class TrialClient:
    """Registers on the server's inbound callbacks; one instance per server."""

    def __init__(self, state, signer: Optional[PlanSigner] = None):
        self._state = state
        self.signer = signer or PlanSigner.for_server(state.settings.db_path)
        self._lock = threading.Lock()
        self._trials: dict[str, tuple[str, Future]] = {}    # trial_id -> (agent asked, answer)
        self._answered: collections.deque = collections.deque(maxlen=_ANSWERED_MAX)
        self.dropped: collections.Counter = collections.Counter()   # DropReason -> count
        self._statuses: dict[tuple[str, str], tuple[frozenset, Future]] = {}
        self._subscribers: list[StatusCallback] = []
        state.on(InboundKind.TRIAL_RESULT, self._on_trial_result)
        state.on(InboundKind.PLAN_STATUS, self._on_plan_status)

    # ------------------------------------------------------------------ requests
    def request(self, agent_id: str, doc: Mapping[str, Any], eval_json: str, timeout_s: float,
                trial_id: Optional[str] = None) -> dict:
        """Runs one trial on the agent; the evidence dict, or TrialError (error, timeout, gone)."""
        plan = self.signer.sign(plan_message(doc), PlanPurpose.TRIAL)
        trial_id = trial_id or f"{plan.plan_id}.trial-{secrets.token_hex(8)}"
        future: Future = Future()
        with self._lock:
            if trial_id in self._trials:
                raise TrialError(f"trial {trial_id!r} is already waiting for agent {agent_id}")
            self._trials[trial_id] = (agent_id, future)
        try:
            msg = pb.ControlMessage(trial=pb.TrialRequest(trial_id=trial_id, plan=plan,
                                                          eval_json=eval_json))
            self._send(agent_id, msg, f"trial {trial_id}")
            result: pb.TrialResult = self._wait(future, agent_id, timeout_s, f"trial {trial_id}")
        finally:
            with self._lock:
                self._trials.pop(trial_id, None)
        return _evidence(result, agent_id)

    def apply(self, agent_id: str, doc: Mapping[str, Any], timeout_s: float) -> StatusReport:
        """Sends ApplyPlan; the agent's APPLIED / REFUSED / FAILED, or AgentGone / TrialError."""
        plan = self.signer.sign(plan_message(doc), PlanPurpose.APPLY)
        expect = frozenset({StatusState.APPLIED, StatusState.REFUSED, StatusState.FAILED})
        report = self._status_call(agent_id, plan.plan_id, expect,
                                   pb.ControlMessage(apply_plan=plan), timeout_s,
                                   f"apply {plan.plan_id}")
        if report.state is StatusState.APPLIED and report.sha256 != plan.sha256:
            return dataclasses.replace(report, state=StatusState.FAILED, detail=json.dumps(
                {"error": f"agent {agent_id} reported applying sha256 {report.sha256[:12]}, "
                          f"not the plan sent ({plan.sha256[:12]})"}))
        return report

    def rollback(self, agent_id: str, plan_id: str, reason: str, timeout_s: float) -> StatusReport:
        """Sends Rollback; the agent's ROLLED_BACK (or FAILED), or AgentGone / TrialError."""
        expect = frozenset({StatusState.ROLLED_BACK, StatusState.FAILED})
        msg = pb.ControlMessage(rollback=pb.Rollback(plan_id=plan_id, reason=reason))
        return self._status_call(agent_id, plan_id, expect, msg, timeout_s, f"rollback {plan_id}")

    def subscribe(self, callback: StatusCallback) -> None:
        """callback(StatusReport) for every PlanStatus no request is waiting for."""
        with self._lock:
            self._subscribers.append(callback)

    def connected(self, agent_id: str) -> bool:
        return agent_id in self._state.connected_agents()

    # ------------------------------------------------------------------ internals
    def _status_call(self, agent_id: str, plan_id: str, expect: frozenset,
                     msg: pb.ControlMessage, timeout_s: float, what: str) -> StatusReport:
        key, future = (agent_id, plan_id), Future()
        with self._lock:
            if key in self._statuses:
                raise TrialError(f"{what}: a request for plan {plan_id} on agent {agent_id} "
                                 "is already waiting")
            self._statuses[key] = (expect, future)
        try:
            self._send(agent_id, msg, what)
            return self._wait(future, agent_id, timeout_s, what)
        finally:
            with self._lock:
                self._statuses.pop(key, None)

    def _send(self, agent_id: str, msg: pb.ControlMessage, what: str) -> None:
        if not self._state.send_to_agent(agent_id, msg):
            raise AgentGone(f"{what}: agent {agent_id} is not connected (or does not read "
                            "its stream)")

    def _wait(self, future: Future, agent_id: str, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrialError(f"{what}: agent {agent_id} did not answer within {timeout_s:g} s")
            try:
                return future.result(timeout=min(left, _POLL_S))
            except FutureTimeout:
                if not self.connected(agent_id):
                    raise AgentGone(f"{what}: agent {agent_id} disconnected before answering") \
                        from None

    def _on_trial_result(self, agent_id: str, result: pb.TrialResult) -> None:
        """Accepts the answer of the agent asked, once; drops and counts anything else."""
        with self._lock:
            reason = self._trial_drop_reason(agent_id, result.trial_id)
            if reason is None:
                _, future = self._trials.pop(result.trial_id)
                self._answered.append(result.trial_id)
            else:
                self.dropped[reason] += 1
        if reason is not None:
            log.warning("dropped TrialResult %r from agent %s: %s", result.trial_id[:80],
                        agent_id, reason.value)
            return
        future.set_result(result)

    def _trial_drop_reason(self, agent_id: str, trial_id: str) -> Optional[DropReason]:
        """Under self._lock."""
        pending = self._trials.get(trial_id)
        if pending is None:
            return DropReason.DUPLICATE if trial_id in self._answered else DropReason.UNKNOWN_TRIAL
        if pending[0] != agent_id:
            return DropReason.WRONG_AGENT
        return DropReason.DUPLICATE if pending[1].done() else None

    def _on_plan_status(self, agent_id: str, status: pb.PlanStatus) -> None:
        report = StatusReport(agent_id, status.plan_id, status.sha256,
                              _STATE_OF.get(status.state, StatusState.UNSPECIFIED), status.detail,
                              time.time())
        with self._lock:
            expect, future = self._statuses.get((agent_id, status.plan_id), (frozenset(), None))
            subscribers = list(self._subscribers)
        if future is not None and report.state in expect and not future.done():
            future.set_result(report)
            return
        for callback in subscribers:
            try:
                callback(report)
            except Exception:   # a faulty subscriber must not cut the agent's stream
                log.exception("plan status subscriber failed for %s from %s", status.plan_id,
                              agent_id)


def _evidence(result: pb.TrialResult, agent_id: str) -> dict:
    if result.error:
        raise TrialError(f"agent {agent_id}: {result.error}")
    try:
        return parse_evidence_doc(result.evidence_json)   # the contract's fields and types
    except EvidenceError as e:
        raise TrialError(f"agent {agent_id} sent {e}") from None
