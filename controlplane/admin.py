"""The Admin RPCs: operators' and the dashboard's commands, one typed method each.

    ListAgents UnbindAgent AnalysisSummary      ListPlans ShowPlan TriggerPlan GetJob ListJobs
    ApprovePlan RejectPlan RollbackPlan         ListAudit VerifyAudit ShowPolicy ReloadPolicy

`method_handlers(service)` is what the server merges into its generic handler. Each method needs
a role (controlplane/auth.py METHOD_ROLES: viewer < operator < approver < admin), checked before
the request is parsed. The audit log records the authenticated principal (operator:<certificate
CN or token subject>); only a local caller on a loopback server without TLS names itself, in the
`headroom-actor` call metadata (required by methods that change something). Bad arguments answer
INVALID_ARGUMENT, unknown plans and jobs NOT_FOUND, wrong plan states FAILED_PRECONDITION.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
from google.protobuf.message import DecodeError

from headroom_sidecar.controlplane import admin_replies as replies
from headroom_sidecar.controlplane import analysis
from headroom_sidecar.controlplane.audit import AuditHead, AuditLog
from headroom_sidecar.controlplane.auth import AuthError, Principal, PrincipalKind, authorize_method
from headroom_sidecar.controlplane.evalsets import EvalSettings
from headroom_sidecar.controlplane.loop import (ControlLoop, IdentityError, LoopError, LoopSettings, PlanRequest, Policies,
                               operator_actor)
from headroom_sidecar.controlplane.planner import PlannerSettings, QualityBudget
from headroom_sidecar.controlplane.plan_diff import plan_diff
from headroom_sidecar.controlplane.plan_status import IllegalTransition
from headroom_sidecar.controlplane.plans import PlanStore
from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.controlplane.policy import PolicySettings
from headroom_sidecar.controlplane.rollout import Fleet, Rollout, RolloutSettings
from headroom_sidecar.controlplane.trials import TrialClient
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.client import ACTOR_METADATA

log = logging.getLogger("headroom_sidecar.controlplane.admin")

DEFAULT_LIMIT = 100           # ListPlans, ListAudit rows when the request sets no limit
DEFAULT_ANALYSIS_LIMIT = 10   # AnalysisSummary rows per ranking


class AdminError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ControlSettings:
    """The closed loop's settings, each component's own object (argument > env > default)."""
    policy: PolicySettings = field(default_factory=PolicySettings.resolve)
    loop: LoopSettings = field(default_factory=LoopSettings.resolve)
    rollout: RolloutSettings = field(default_factory=RolloutSettings.resolve)
    eval: EvalSettings = field(default_factory=EvalSettings.resolve)
    planner: PlannerSettings = field(default_factory=PlannerSettings.resolve)


# ---------------------------------------------------------------------- arguments
def _invalid(message: str) -> AdminError:
    return AdminError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _required(value: str, name: str) -> str:
    if not value.strip():
        raise _invalid(f"argument {name!r} is required")
    return value


def _limit(request, default: int) -> int:
    """request.limit when set (>= 1), else default."""
    if not request.HasField("limit"):
        return default
    if request.limit < 1:
        raise _invalid(f"argument 'limit': must be >= 1, got {request.limit}")
    return request.limit


def _budget(message: pb.QualityBudget) -> QualityBudget:
    """The fields the request sets over QualityBudget's defaults; each a finite number."""
    given = {f.name: getattr(message, f.name) for f in dataclasses.fields(QualityBudget)
             if message.HasField(f.name)}
    for name, value in given.items():
        if not math.isfinite(value):
            raise _invalid(f"argument 'budget.{name}': expected a finite number, got {value!r}")
    return dataclasses.replace(QualityBudget(), **given)


def _eval(text: str) -> dict:
    """eval_json: the eval-set overrides as a JSON object ("" = none)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid(f"argument 'eval_json' is not JSON: line {e.lineno}, column {e.colno}: "
                       f"{e.msg}") from None
    if not isinstance(value, dict):
        raise _invalid(f"argument 'eval_json': expected an object, got {type(value).__name__}")
    return value


def _plan_status(text: str) -> Optional[PlanStatus]:
    if not text:
        return None
    try:
        return PlanStatus(text)
    except ValueError:
        raise _invalid(f"argument 'status': unknown plan status {text!r}; known: "
                       f"{', '.join(s.value for s in PlanStatus)}") from None


# ---------------------------------------------------------------------- the handlers
class ControlPlane:
    """Everything the Admin RPCs act on, built once per server over the store's DuckDB file."""

    def __init__(self, store, state, settings: Optional[ControlSettings] = None):
        self.settings = settings or ControlSettings()
        self.store, self.state = store, state
        self._con, lock = store.control_cursor()
        self.plans = PlanStore(self._con, lock)
        self.audit = AuditLog(self._con, lock)
        self.policies = Policies(self.settings.policy.folder)
        if self.policies.store is None:
            log.error("policy set %s did not load; plans cannot be decided until "
                      "ReloadPolicy succeeds: %s", self.policies.folder,
                      "; ".join(self.policies.problems))
        self.client = TrialClient(state)
        self.fleet = Fleet(store, state)
        self.rollout = Rollout(self.plans, self.audit, self.client, self.fleet,
                               self.settings.rollout)
        self.loop = ControlLoop(store, state, self.plans, self.audit, self.policies, self.client,
                                self.rollout, self.settings.loop, self.settings.eval,
                                self.settings.planner)

    def close(self) -> None:
        self.loop.close()
        self._con.close()

    # ------------------------------------------------------------------ dispatch
    def call(self, method: str, raw: bytes, context: grpc.ServicerContext,
             principal: Optional[Principal] = None):
        """One Admin RPC: raw request bytes in, the reply message or an error status out.
        principal: who the server authenticated; their role must cover the method
        (controlplane.auth.METHOD_ROLES) and they, not the actor metadata, are the audit actor."""
        request_cls = METHODS[method][0]
        try:
            typed = _typed_actor(context)
            actor = typed
            if principal is not None:
                authorize_method(principal, method)
                actor = self._actor(principal, typed, method)
            request = request_cls.FromString(raw)
            return self.handle(method, request, actor)
        except AuthError as e:
            context.abort(e.code, e.message)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method}: cannot parse {request_cls.__name__}: {e}")
        except AdminError as e:
            context.abort(e.code, e.message)

    def handle(self, method: str, request, actor: str = ""):
        """The reply of one typed request, or AdminError with the status it answers."""
        _, handler = METHODS[method]
        try:
            return handler(self, request, actor)
        except AdminError as e:
            raise AdminError(e.code, f"{method}: {e.message}") from None
        except IdentityError as e:
            raise AdminError(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {e}") from None
        except KeyError as e:
            raise AdminError(grpc.StatusCode.NOT_FOUND, f"{method}: {e.args[0]}") from None
        except (LoopError, IllegalTransition) as e:
            raise AdminError(grpc.StatusCode.FAILED_PRECONDITION, f"{method}: {e}") from None
        except (ValueError, TypeError) as e:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {e}") from None

    @staticmethod
    def _actor(principal: Principal, typed: str, method: str) -> str:
        actor = principal.audit_actor(typed)
        if principal.kind is PrincipalKind.OPERATOR and typed.strip() and \
                typed.strip() not in (principal.subject, actor):
            log.info("%s: client named itself %r; recorded as %s (its credential)",
                     method, typed, actor)
        return actor

    # ------------------------------------------------------------------ agents and analysis
    def unbind_agent(self, request: pb.UnbindAgentRequest, actor: str) -> pb.UnbindAgentReply:
        """Releases an agent id's certificate binding (a re-issued certificate may then claim it)."""
        agent_id = _required(request.agent_id, "agent_id")
        bindings = getattr(self.state, "bindings", None)
        released = bool(bindings and bindings.unbind(agent_id))
        self.audit.append(AuditKind.NOTE, operator_actor(actor), agent_id,
                          {"event": "agent_unbound", "released": released})
        return pb.UnbindAgentReply(agent_id=agent_id, released=released)

    def list_agents(self, request: pb.ListAgentsRequest, actor: str) -> pb.ListAgentsReply:
        live = set(self.state.connected_agents())
        with self.store.reader() as cur:
            cur.execute("SELECT agent_id, fingerprint, model_name, architecture, num_layers, "
                        "num_heads, hostname, pid, agent_version, epoch_us(last_seen) AS "
                        "last_seen_us FROM agents ORDER BY agent_id")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        return pb.ListAgentsReply(agents=[
            pb.AgentInfo(**{k: v for k, v in r.items() if v is not None},
                         connected=r["agent_id"] in live) for r in rows])

    def analysis_summary(self, request: pb.AnalysisRequest, actor: str) -> pb.AnalysisReply:
        """What the traces say: least used heads, lowest-influence layers, sparsest MLPs,
        latency per query class; narrowed to one agent and/or one model fingerprint."""
        scope = {"agent_id": request.agent_id or None, "fingerprint": request.fingerprint or None}
        limit = _limit(request, DEFAULT_ANALYSIS_LIMIT)
        with self.store.reader() as cur:
            heads = analysis.least_used_heads(cur, limit=limit, **scope)
            layers = analysis.lowest_influence_layers(cur, limit=limit, **scope)
            mlps = analysis.sparsest_mlps(cur, limit=limit, **scope)
            latency = analysis.latency_by_query_class(cur, **scope)
        return pb.AnalysisReply(
            least_used_heads=[replies.from_dataclass(pb.HeadUsage, h) for h in heads],
            lowest_influence_layers=[replies.from_dataclass(pb.LayerInfluence, x) for x in layers],
            sparsest_mlps=[replies.from_dataclass(pb.MlpSparsity, m) for m in mlps],
            latency_by_query_class=[replies.from_dataclass(pb.QueryClassLatency, q)
                                    for q in latency])

    # ------------------------------------------------------------------ plans and jobs
    def list_plans(self, request: pb.ListPlansRequest, actor: str) -> pb.ListPlansReply:
        records = self.plans.list(status=_plan_status(request.status),
                                  fingerprint=request.fingerprint or None,
                                  limit=_limit(request, DEFAULT_LIMIT))
        return pb.ListPlansReply(plans=[replies.plan_record(r) for r in records])

    def show_plan(self, request: pb.ShowPlanRequest, actor: str) -> pb.ShowPlanReply:
        plan_id = _required(request.plan_id, "plan_id")
        history = self.plans.history(plan_id)
        facts = self.fleet.model_facts(history.plan.fingerprint)
        diff = plan_diff(history.plan.doc, facts) if facts else \
            ["(model facts unknown: no agent with this fingerprint has registered)"]
        return replies.show_plan(history, diff, self.rollout.running_on(plan_id))

    def trigger_plan(self, request: pb.TriggerPlanRequest, actor: str) -> pb.Job:
        if not request.agent_id and not request.fingerprint:
            raise _invalid("give 'agent_id' or 'fingerprint'")
        max_trials = request.max_trials if request.HasField("max_trials") else None
        if max_trials is not None and max_trials < 1:
            raise _invalid(f"argument 'max_trials': must be >= 1, got {max_trials}")
        plan_request = PlanRequest(
            agent_id=request.agent_id or None, fingerprint=request.fingerprint or None,
            query_class=request.query_class or None, max_trials=max_trials,
            budget=_budget(request.budget), eval=_eval(request.eval_json), tenant=request.tenant,
            route=request.route, requires_determinism=request.requires_determinism)
        who = operator_actor(actor) if actor else "planner"
        job = self.loop.trigger(plan_request, actor=who)
        self.audit.append(AuditKind.NOTE, who, job.job_id, {
            "event": "planning_started", "fingerprint": job.fingerprint, "agent_id": job.agent_id,
            "query_class": job.query_class, "max_trials": max_trials})
        return replies.from_dataclass(pb.Job, job)

    def get_job(self, request: pb.GetJobRequest, actor: str) -> pb.Job:
        job_id = _required(request.job_id, "job_id")
        return replies.from_dataclass(pb.Job, self.loop.job(job_id))

    def list_jobs(self, request: pb.ListJobsRequest, actor: str) -> pb.ListJobsReply:
        return pb.ListJobsReply(jobs=[replies.from_dataclass(pb.Job, j) for j in self.loop.jobs()])

    def approve_plan(self, request: pb.PlanVerdictRequest, actor: str) -> pb.Job:
        plan_id, reason = _verdict(request)
        return replies.from_dataclass(pb.Job, self.loop.approve(plan_id, actor, reason))

    def reject_plan(self, request: pb.PlanVerdictRequest, actor: str) -> pb.RejectPlanReply:
        plan_id, reason = _verdict(request)
        result = self.loop.reject(plan_id, actor, reason)
        return pb.RejectPlanReply(plan_id=result["plan_id"], status=result["status"])

    def rollback_plan(self, request: pb.PlanVerdictRequest, actor: str) -> pb.RollbackPlanReply:
        plan_id, reason = _verdict(request)
        return replies.rollback(self.loop.rollback(plan_id, actor, reason))

    # ------------------------------------------------------------------ audit and policy
    def list_audit(self, request: pb.ListAuditRequest, actor: str) -> pb.ListAuditReply:
        kind = request.kind or None
        if kind is not None and kind not in AuditKind.__members__:
            raise _invalid(f"argument 'kind': unknown audit kind {kind!r}; known: "
                           f"{', '.join(AuditKind.__members__)}")
        rows = self.audit.rows(
            kind=kind, subject=request.subject or None, actor=request.actor or None,
            text=request.text or None,
            after_seq=request.after_seq if request.HasField("after_seq") else None,
            limit=_limit(request, DEFAULT_LIMIT), newest_first=not request.oldest_first)
        return pb.ListAuditReply(rows=[replies.audit_row(r) for r in rows])

    def verify_audit(self, request: pb.VerifyAuditRequest, actor: str) -> pb.VerifyAuditReply:
        anchor = None
        if request.HasField("anchor"):
            a = request.anchor   # the anchor file's or an earlier verify's `head`
            try:
                anchor = AuditHead.from_dict({"seq": a.seq, "row_hash": a.row_hash, "mac": a.mac,
                                              "keyed_since": a.keyed_since})
            except ValueError as e:
                raise _invalid(f"argument {e}") from None
        result = self.audit.verify(anchor=anchor)
        return replies.verify(result, self.audit.head())

    def reload_policy(self, request: pb.ReloadPolicyRequest, actor: str) -> pb.ReloadPolicyReply:
        result = self.policies.reload()
        shown = self.policies.show()
        self.audit.append(AuditKind.POLICY_RELOADED, operator_actor(actor) if actor else "admin",
                          self.policies.folder, {**result, "revision": shown.get("revision")})
        return pb.ReloadPolicyReply(ok=result["ok"], changed=result["changed"],
                                    problems=result["problems"], policy=replies.policy_set(shown))

    def show_policy(self, request: pb.ShowPolicyRequest, actor: str) -> pb.PolicySet:
        return replies.policy_set(self.policies.show())


def _verdict(request: pb.PlanVerdictRequest) -> tuple[str, str]:
    return _required(request.plan_id, "plan_id"), _required(request.reason, "reason")


def _typed_actor(context: grpc.ServicerContext) -> str:
    """What the caller named itself in the ACTOR_METADATA call metadata ("" = nothing)."""
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA and isinstance(value, str):
            return value
    return ""


# ---------------------------------------------------------------------- the registration table
# RPC method name -> (request message, handler). Roles: controlplane/auth.py METHOD_ROLES.
METHODS: dict[str, tuple[type, Callable[[ControlPlane, Any, str], Any]]] = {
    "ListAgents": (pb.ListAgentsRequest, ControlPlane.list_agents),
    "UnbindAgent": (pb.UnbindAgentRequest, ControlPlane.unbind_agent),
    "AnalysisSummary": (pb.AnalysisRequest, ControlPlane.analysis_summary),
    "ListPlans": (pb.ListPlansRequest, ControlPlane.list_plans),
    "ShowPlan": (pb.ShowPlanRequest, ControlPlane.show_plan),
    "TriggerPlan": (pb.TriggerPlanRequest, ControlPlane.trigger_plan),
    "GetJob": (pb.GetJobRequest, ControlPlane.get_job),
    "ListJobs": (pb.ListJobsRequest, ControlPlane.list_jobs),
    "ApprovePlan": (pb.PlanVerdictRequest, ControlPlane.approve_plan),
    "RejectPlan": (pb.PlanVerdictRequest, ControlPlane.reject_plan),
    "RollbackPlan": (pb.PlanVerdictRequest, ControlPlane.rollback_plan),
    "ListAudit": (pb.ListAuditRequest, ControlPlane.list_audit),
    "VerifyAudit": (pb.VerifyAuditRequest, ControlPlane.verify_audit),
    "ShowPolicy": (pb.ShowPolicyRequest, ControlPlane.show_policy),
    "ReloadPolicy": (pb.ReloadPolicyRequest, ControlPlane.reload_policy),
}


def method_handlers(service) -> dict[str, grpc.RpcMethodHandler]:
    """The Admin RPCs for the server's generic handler. service: the server's HeadroomService
    (its _operator_gate authenticates, bounds the request size and takes an operator slot)."""
    return {name: grpc.unary_unary_rpc_method_handler(
                functools.partial(_serve, service, name),
                response_serializer=lambda reply: reply.SerializeToString())
            for name in METHODS}


def _serve(service, method: str, raw: bytes, context: grpc.ServicerContext):
    principal = service._operator_gate(raw, context, method)
    try:
        return service.state.control.call(method, raw, context, principal)
    finally:
        service.state.operator_call_done()
