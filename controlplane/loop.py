"""The closed loop: traces -> candidates -> trials on an agent -> best plan -> policy -> rollout.

One planning job per model fingerprint at a time, each on its own thread; the Admin RPC starts
them (plan.trigger) and reads their progress (plan.status). A decision is recorded with every
rule's outcome, value and threshold and the policy revision, in the plan store and the audit
log; approve goes straight to rollout, needs_human waits for an operator's approve/reject.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from headroom_sidecar.controlplane.audit import AuditLog
from headroom_sidecar.controlplane.evalsets import EvalSettings, eval_json
from headroom_sidecar.controlplane.inbound import InboundKind
from headroom_sidecar.controlplane.jobs import Job, JobState, JobStore, Stage  # noqa: F401 (Job* re-exported)
from headroom_sidecar.controlplane.planner import (CandidateScope, Planner, PlannerSettings, QualityBudget,
                                  load_candidates)
from headroom_sidecar.controlplane.planner.classjob import search_class
from headroom_sidecar.controlplane.admin_replies import jsonable
from headroom_sidecar.controlplane.planner.recorder import StoreRecorder
from headroom_sidecar.controlplane.planner.search import PlanTarget
from headroom_sidecar.controlplane.policy.engine import trade_rule
from headroom_sidecar.controlplane.policy.schema import Objective
from headroom_sidecar.controlplane.plans import Decision, PlanStore
from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.controlplane.policy import (Context, Evidence, ModelFacts, Outcome, PolicyError,
                                 PolicyStore, Revision)
from headroom_sidecar.controlplane.recovery import RolloutRecovery
from headroom_sidecar.controlplane.rollout import Rollout, RolloutResult
from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.controlplane.trials import TrialClient

log = logging.getLogger("headroom_sidecar.controlplane.loop")

PLANNER_ACTOR = "planner"
POLICY_ACTOR = "policy-engine"


def _env(name: str) -> dict:
    return {"env": f"HEADROOM_LOOP_{name}"}


@dataclass(frozen=True)
class LoopSettings:
    # One trial (baseline + plan on the eval set) must answer within this.
    trial_timeout_s: float = field(default=600.0, metadata=_env("TRIAL_TIMEOUT_S"))
    # Trials per planning run when plan.trigger does not say (0: the planner's own default).
    max_trials: int = field(default=0, metadata=_env("MAX_TRIALS"))
    # Finished jobs kept for plan.status (in the jobs table, across restarts).
    jobs_kept: int = field(default=100, metadata=_env("JOBS_KEPT"))
    # After a restart, how long a plan left applying waits for its canary to reconnect and say
    # what it runs; then the plan fails (see controlplane/recovery.py).
    reconcile_timeout_s: float = field(default=600.0, metadata=_env("RECONCILE_TIMEOUT_S"))

    def __post_init__(self):
        bad = [f"{n}={getattr(self, n)} must be > 0"
               for n in ("trial_timeout_s", "jobs_kept", "reconcile_timeout_s")
               if getattr(self, n) <= 0]
        if self.max_trials < 0:
            bad.append(f"max_trials={self.max_trials} must be >= 0")
        if bad:
            raise ValueError("invalid LoopSettings: " + "; ".join(bad))

    @classmethod
    def resolve(cls, **overrides: Any) -> "LoopSettings":
        return resolve_settings(cls, overrides, "loop")


class LoopError(ValueError):
    """A request the loop cannot act on (no agent, job already running, ...): says why."""


class IdentityError(LoopError):
    """A command that changes something came without the caller's identity."""


@dataclass(frozen=True)
class PlanRequest:
    """What plan.trigger asks for; everything but the target is optional."""
    agent_id: Optional[str] = None
    fingerprint: Optional[str] = None
    query_class: Optional[str] = None
    max_trials: Optional[int] = None
    budget: QualityBudget = QualityBudget()
    eval: Mapping[str, Any] = field(default_factory=dict)       # eval_json overrides
    tenant: str = ""
    route: str = ""
    requires_determinism: bool = False


class Policies:
    """The policy set in force, or, when the folder never loaded, why not (telemetry goes on)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._lock = threading.Lock()
        self.store: Optional[PolicyStore] = None
        self.problems: list[str] = []
        self.reload()

    def reload(self) -> dict:
        with self._lock:
            if self.store is None:
                try:
                    self.store = PolicyStore(self.folder)
                    self.problems = []
                    return {"ok": True, "changed": True, "problems": []}
                except PolicyError as e:
                    self.problems = [str(p) for p in e.problems]
                    return {"ok": False, "changed": False, "problems": self.problems}
            result = self.store.reload()
            self.problems = [str(p) for p in result.problems]
            return {"ok": result.ok, "changed": result.changed, "problems": self.problems}

    def show(self) -> dict:
        with self._lock:
            store, problems = self.store, list(self.problems)
        out = {"folder": self.folder, "loaded": store is not None, "problems": problems}
        if store is not None:
            current = store.current
            out.update(revision=current.revision.to_dict(), files=list(current.files),
                       rules=[{"id": r.id, "kind": r.kind.value, "file": r.file, "line": r.line}
                              for r in current.rules])
        return out

    def require(self) -> PolicyStore:
        with self._lock:
            if self.store is None:
                raise LoopError(f"no policy set is loaded from {self.folder}: "
                                + "; ".join(self.problems))
            return self.store


def operator_actor(actor: str) -> str:
    """'alice' -> 'operator:alice'; 'operator:alice' stays; empty is refused."""
    actor = (actor or "").strip()
    if not actor:
        raise IdentityError("this command needs the caller's identity (--as or HEADROOM_OPERATOR)")
    return actor if ":" in actor else f"operator:{actor}"


def _revision_name(rev: Revision) -> str:
    if rev.git_commit:
        return rev.git_commit + ("+dirty" if rev.git_dirty else "")
    return f"sha256:{rev.content_sha256}"


# A class job's trials measure on the class's own recent prompts, as the agent recorded them,
# unless the trigger's eval arguments say otherwise (speculation's gain depends on the prompts).
CLASS_TRAFFIC_PROMPTS = 4


def _eval_args(request: PlanRequest) -> Mapping[str, Any]:
    if request.query_class and "traffic_prompts" not in request.eval:
        return {**request.eval, "traffic_prompts": CLASS_TRAFFIC_PROMPTS}
    return request.eval


class ControlLoop:
    def __init__(self, store, state, plans: PlanStore, audit: AuditLog, policies: Policies,
                 client: TrialClient, rollout: Rollout, settings: Optional[LoopSettings] = None,
                 eval_settings: Optional[EvalSettings] = None,
                 planner_settings: Optional[PlannerSettings] = None):
        self.store, self.state = store, state
        self.plans, self.audit, self.policies = plans, audit, policies
        self.client, self.rollout = client, rollout
        self.fleet = rollout.fleet
        self.settings = settings or LoopSettings.resolve()
        self.eval_settings = eval_settings or EvalSettings.resolve()
        self.planner_settings = planner_settings or PlannerSettings.resolve()
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}     # this process's jobs; every change also in the table
        self._threads: dict[str, threading.Thread] = {}
        self._jobs_con, lock = store.control_cursor()   # closed by close()
        self.jobstore = JobStore(self._jobs_con, lock)
        self.recovery = RolloutRecovery(plans, audit, self.jobstore, rollout._supersede_others,
                                        self.settings.reconcile_timeout_s)
        self._recover()

    def _recover(self) -> None:
        """Before any job runs: jobs a dead process left running become interrupted, and plans
        it left applying wait for their agents' hellos (controlplane/recovery.py)."""
        for job in self.jobstore.interrupt_running():
            log.warning("job %s: %s", job.job_id, job.last_error)
            self.audit.append(AuditKind.NOTE, "recovery", job.job_id,
                              {"event": "job_interrupted", "kind": job.kind,
                               "stage": job.stage.value, "plan_id": job.plan_id,
                               "reason": job.last_error})
        self.recovery.start()
        self.state.on(InboundKind.HELLO, self.recovery.on_hello)

    def close(self) -> None:
        self.recovery.close()
        self._jobs_con.close()

    def _update(self, job: Job, **changes: Any) -> None:
        """Every change a job goes through is written, so a restart finds where it was."""
        for name, value in changes.items():
            setattr(job, name, value)
        self.jobstore.save(job)

    # ------------------------------------------------------------------ jobs
    def trigger(self, request: PlanRequest, actor: str = PLANNER_ACTOR) -> Job:
        """Starts a planning job on its own thread; LoopError if it cannot start."""
        fingerprint, agent_id = self._target(request)
        spec = eval_json(self.eval_settings, _eval_args(request))   # bad eval args fail here
        job = Job(f"job-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}", "plan",
                  fingerprint, agent_id, request.query_class or "", actor)
        self._start(job, lambda: self._plan_job(job, request, spec))
        return job

    def _start(self, job: Job, body) -> None:
        with self._lock:
            busy = [j for j in self._jobs.values()
                    if j.fingerprint == job.fingerprint and j.state is JobState.RUNNING]
            if busy:
                raise LoopError(f"job {busy[0].job_id} is still running for model "
                                f"{job.fingerprint[:12]}; one at a time per model")
            self._jobs[job.job_id] = job
            thread = threading.Thread(target=self._run_job, args=(job, body), daemon=True,
                                      name=f"headroom-{job.job_id}")
            self._threads[job.job_id] = thread
            self._forget_old()
        self.jobstore.save(job)
        thread.start()

    def _run_job(self, job: Job, body) -> None:
        state, message = JobState.DONE, None
        try:
            body()
        except Exception as e:   # the job's status says what failed; the server goes on
            log.exception("job %s failed", job.job_id)
            state, message = JobState.FAILED, f"{type(e).__name__}: {e}"
        # Everything a poller reads is filled in before the state says the job ended.
        if job.plan_id is not None:
            plan = self.plans.get(job.plan_id)
            job.plan_status = plan.status.value if plan else None
        if message is not None:
            job.message = job.last_error = message
        job.finished_at_s = time.time()
        job.stage = Stage.FINISHED
        job.state = state
        try:
            self.jobstore.save(job)
            self.jobstore.prune(self.settings.jobs_kept)
        except Exception:   # the store closed under a job that outlived its server
            log.exception("job %s: could not write its end", job.job_id)

    def _forget_old(self) -> None:
        done = [j for j in self._jobs.values() if j.state is not JobState.RUNNING]
        for j in sorted(done, key=lambda j: j.started_at_s)[:max(0, len(done) - self.settings.jobs_kept)]:
            self._jobs.pop(j.job_id, None)
            self._threads.pop(j.job_id, None)

    def jobs(self) -> list[Job]:
        """Newest first: this process's jobs as they are, and earlier ones from the table."""
        stored = self.jobstore.list(limit=self.settings.jobs_kept + len(self._jobs))
        with self._lock:
            merged = {j.job_id: j for j in stored} | dict(self._jobs)
        return sorted(merged.values(), key=lambda j: j.started_at_s, reverse=True)

    def job(self, job_id: str) -> Job:
        with self._lock:
            if job_id in self._jobs:
                return self._jobs[job_id]
        stored = self.jobstore.get(job_id)   # a job from before a restart: its final state
        if stored is None:
            raise KeyError(f"no job {job_id!r}")
        return stored

    def wait(self, job_id: str, timeout_s: float) -> Job:
        with self._lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout_s)
        return self.job(job_id)

    # ------------------------------------------------------------------ planning
    def _target(self, request: PlanRequest) -> tuple[str, str]:
        """(fingerprint, the connected agent that runs the trials)."""
        if request.agent_id:
            agent = self.fleet.agent(request.agent_id)
            if agent is None:
                raise LoopError(f"no agent {request.agent_id!r} has ever connected")
            if request.fingerprint and request.fingerprint != agent["fingerprint"]:
                raise LoopError(f"agent {request.agent_id} runs model {agent['fingerprint'][:12]}, "
                                f"not {request.fingerprint[:12]}")
            if not self.client.connected(request.agent_id):
                raise LoopError(f"agent {request.agent_id} is not connected")
            return agent["fingerprint"], request.agent_id
        if not request.fingerprint:
            raise LoopError("give agent_id or fingerprint")
        agents = self.fleet.agents(request.fingerprint)
        if not agents:
            raise LoopError(f"no connected agent runs model {request.fingerprint[:12]}")
        return request.fingerprint, agents[0]

    def _plan_job(self, job: Job, request: PlanRequest, spec: str) -> None:
        scope = CandidateScope(agent_ids=None, query_class=request.query_class)
        with self.store.reader() as cur:
            candidates = load_candidates(cur, self._scope(job.fingerprint, scope),
                                         self.planner_settings)
        if candidates.traced_requests == 0:
            raise LoopError(f"no traced requests for model {job.fingerprint[:12]}"
                            + (f" and query class {request.query_class!r}" if request.query_class
                               else "") + "; raise the agents' sample_rate or wait")
        if request.query_class:
            return self._class_job(job, request, spec)
        result = self._search(job, request, spec, candidates)
        job.message = f"{result.stop_reason}; objective: {result.objective.value}"
        if result.best is None:
            job.message = (f"no hypothesis fit the quality and latency budget "
                           f"({result.stop_reason}; objective: {result.objective.value})")
            return
        rolled_out = self._decide_and_roll_out(job, request, result.best, result.best_trial)
        if rolled_out is not None:
            job.message = rolled_out

    def _class_job(self, job: Job, request: PlanRequest, spec: str) -> None:
        """A query class chooses only how it speculates (weights are process-wide on the
        agent): planner/classjob.py; the chosen plan is decided and rolled out as any other."""
        result = search_class(self, job, request, spec, PLANNER_ACTOR)
        job.message = result.message
        if result.best is None:
            return
        rolled_out = self._decide_and_roll_out(job, request, result.best, result.best_trial)
        if rolled_out is not None:
            job.message = f"{result.message}; {rolled_out}"

    def _decide_and_roll_out(self, job: Job, request: PlanRequest, best: dict,
                             best_trial) -> Optional[str]:
        """The policy engine decides the job's best plan; an approved one rolls out at once.
        Returns the rollout's message, None when the plan was not approved."""
        self._update(job, plan_id=best["plan_id"])
        context = Context(tenant=request.tenant, route=request.route,
                          query_class=request.query_class or "",
                          requires_determinism=request.requires_determinism)
        self._update(job, stage=Stage.DECIDING)
        outcome = self.decide(job.plan_id, best_trial.evidence, context)
        self._update(job, decision=outcome.value)
        if outcome is not Outcome.APPROVE:
            return None
        self._update(job, stage=Stage.ROLLING_OUT)
        return self.rollout.run(job.plan_id).message

    def _planner_settings(self, fingerprint: str) -> PlannerSettings:
        """fp32_packed is for fp32 weights on a CPU (other weights are refused by the plan
        rules, other devices leave every layer as it is): no trial to spend elsewhere."""
        dtype, device = self.fleet.model_placement(fingerprint)
        if dtype == "float32" and device.startswith("cpu"):
            return self.planner_settings
        return dataclasses.replace(self.planner_settings, fp32_packed=False)

    def _scope(self, fingerprint: str, scope: CandidateScope) -> CandidateScope:
        with self.store.reader() as cur:
            ids = tuple(a for (a,) in cur.execute(
                "SELECT agent_id FROM agents WHERE fingerprint = ? ORDER BY agent_id",
                [fingerprint]).fetchall())
        return dataclasses.replace(scope, agent_ids=ids)

    def _search(self, job: Job, request: PlanRequest, spec: str, candidates):
        recorder = StoreRecorder(self.plans, self.audit, job.agent_id, actor=PLANNER_ACTOR)

        def evaluate(doc: dict) -> dict:
            self._update(job, trials=job.trials + 1)
            return self.client.request(job.agent_id, doc, spec, self.settings.trial_timeout_s)

        max_trials = request.max_trials
        if max_trials is None and self.settings.max_trials:
            max_trials = self.settings.max_trials
        objective, budget = self._objective(request)
        job.objective = objective.value
        planner = Planner(evaluate, budget, max_trials=max_trials, record=recorder.record,
                          settings=self._planner_settings(job.fingerprint), propose=recorder.propose,
                          objective=objective)
        target = PlanTarget(job.fingerprint, job.job_id,
                            (request.query_class,) if request.query_class else ())
        result = planner.run(target, candidates)
        recorder.settle(result.best["plan_id"] if result.best else None)
        return result

    def _objective(self, request: PlanRequest) -> tuple[Objective, QualityBudget]:
        """Latency first, never slower than unoptimised, unless a policy's latency rule states
        a trade for this tenant/route: then its objective and its bound."""
        context = Context(tenant=request.tenant, route=request.route,
                          query_class=request.query_class or "",
                          requires_determinism=request.requires_determinism)
        traded = trade_rule(self.policies.require().current, context)
        if traded is None:
            return Objective.LATENCY, request.budget
        # The trade's bound replaces the default 1.0; a caller's own stricter bound still holds.
        asked = request.budget.max_latency_ratio
        default = QualityBudget().max_latency_ratio
        bound = traded.params.max_ratio if asked == default else min(asked, traded.params.max_ratio)
        return traded.params.trade, dataclasses.replace(request.budget, max_latency_ratio=bound)

    # ------------------------------------------------------------------ deciding
    def decide(self, plan_id: str, evidence: Mapping[str, Any], context: Context) -> Outcome:
        """Policy evaluation of a trialled plan, recorded; the plan moves to the outcome's status."""
        policy = self.policies.require()
        plan = self.plans.get(plan_id)
        facts = self.fleet.model_facts(plan.fingerprint)
        if facts is None:
            raise LoopError(f"model facts for {plan.fingerprint[:12]} are unknown (agents table)")
        context = dataclasses.replace(context, recent_applies_s=self._recent_applies(plan.fingerprint))
        decision = policy.evaluate(plan.doc, Evidence.from_dict(jsonable(dict(evidence)), strict=False),
                                   ModelFacts.of(facts), context)
        rules = [jsonable(r.to_dict()) for r in decision.results]
        outcome = decision.outcome
        reason = "; ".join(f"{r.rule_id}: {r.message}" for r in decision.failing()) or \
            f"every rule passed or did not apply ({len(rules)} rules)"
        self.plans.record_decision(Decision(plan_id, outcome, rules, _revision_name(decision.revision),
                                            decision.revision.content_sha256, POLICY_ACTOR, reason))
        self.audit.append(AuditKind.POLICY_EVALUATED, POLICY_ACTOR, plan_id, {
            "outcome": outcome.value, "risk": decision.risk, "risk_score": decision.risk_score,
            "revision": decision.revision.to_dict(), "rules": rules,
            "context": jsonable(dataclasses.asdict(context))})
        self.plans.transition(plan_id, _STATUS_OF[outcome], POLICY_ACTOR, reason)
        self.audit.append(_AUDIT_OF[outcome], POLICY_ACTOR, plan_id, {"reason": reason})
        return outcome

    def _recent_applies(self, fingerprint: str) -> tuple[float, ...]:
        """Unix seconds of each plan's first successful apply on this model (rate limits)."""
        with self.store.reader() as cur:
            rows = cur.execute(
                "SELECT min(a.ts_us) FROM applications a JOIN plans p USING (plan_id) "
                "WHERE p.fingerprint = ? AND a.state = 'applied' GROUP BY a.plan_id "
                "ORDER BY 1", [fingerprint]).fetchall()
        return tuple(ts / 1e6 for (ts,) in rows)

    # ------------------------------------------------------------------ operators
    def approve(self, plan_id: str, actor: str, reason: str) -> Job:
        """An operator approves a needs_human plan; its rollout starts on a job thread."""
        actor = operator_actor(actor)
        plan = self._needs_human(plan_id)
        self.plans.record_decision(Decision(plan_id, Outcome.APPROVE, [], "", "", actor,
                                            reason))
        self.plans.transition(plan_id, PlanStatus.APPROVED, actor, reason)
        self.audit.append(AuditKind.APPROVED, actor, plan_id, {"reason": reason})
        job = Job(f"job-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}", "rollout",
                  plan.fingerprint, "", ",".join(plan.query_classes), actor,
                  stage=Stage.ROLLING_OUT, plan_id=plan_id, decision="approve")
        self._start(job, lambda: self._rollout_job(job))
        return job

    def _rollout_job(self, job: Job) -> RolloutResult:
        result = self.rollout.run(job.plan_id)
        job.message = result.message
        return result

    def reject(self, plan_id: str, actor: str, reason: str) -> dict:
        actor = operator_actor(actor)
        self._needs_human(plan_id)
        self.plans.record_decision(Decision(plan_id, Outcome.REJECT, [], "", "", actor,
                                            reason))
        record = self.plans.transition(plan_id, PlanStatus.REJECTED, actor, reason)
        self.audit.append(AuditKind.REJECTED, actor, plan_id, {"reason": reason})
        return {"plan_id": plan_id, "status": record.status.value}

    def rollback(self, plan_id: str, actor: str, reason: str) -> RolloutResult:
        return self.rollout.rollback(plan_id, operator_actor(actor), reason)

    def _needs_human(self, plan_id: str):
        plan = self.plans.get(plan_id)
        if plan is None:
            raise KeyError(f"no plan {plan_id!r}")
        if plan.status is not PlanStatus.NEEDS_HUMAN:
            raise LoopError(f"plan {plan_id} is {plan.status.value}; operators approve or "
                            "reject only needs_human plans")
        return plan


_STATUS_OF = {Outcome.APPROVE: PlanStatus.APPROVED, Outcome.REJECT: PlanStatus.REJECTED,
              Outcome.NEEDS_HUMAN: PlanStatus.NEEDS_HUMAN}
_AUDIT_OF = {Outcome.APPROVE: AuditKind.APPROVED, Outcome.REJECT: AuditKind.REJECTED,
             Outcome.NEEDS_HUMAN: AuditKind.NEEDS_HUMAN}


def default_policy_folder() -> str:
    return os.environ.get("HEADROOM_POLICIES", "policies")
