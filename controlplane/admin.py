"""The Admin RPC: operators' and the dashboard's commands, JSON in and JSON out.

    agents.list                                  plan.list [status, fingerprint, limit]
    plan.show plan_id                            plan.trigger agent_id|fingerprint [query_class,
    plan.status [job_id]                             max_trials, budget{}, eval{}, tenant, route,
    plan.approve|reject|rollback plan_id reason      requires_determinism]
    analysis.summary [agent_id, fingerprint, limit]
    audit.list [kind, subject, actor, text, after_seq, limit, oldest_first]
    audit.verify [anchor{seq, row_hash, mac, keyed_since}]   policy.reload  policy.show
    agents.unbind agent_id

Each command needs a role (controlplane/auth.py COMMAND_ROLES: viewer < operator < approver <
admin). The audit log records the authenticated principal (operator:<certificate CN or token
subject>); AdminRequest.actor is ignored then. Only a local caller on a loopback server without
TLS names itself through AdminRequest.actor (required by commands that change something). Unknown commands and bad arguments
answer INVALID_ARGUMENT, unknown plans NOT_FOUND, wrong plan states FAILED_PRECONDITION.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, Optional

import grpc
from google.protobuf.message import DecodeError

from headroom_sidecar.controlplane import analysis
from headroom_sidecar.controlplane.audit import AuditHead, AuditKind, AuditLog
from headroom_sidecar.controlplane.auth import AuthError, Principal, PrincipalKind, authorize_command
from headroom_sidecar.controlplane.credentials import ClientCredentials
from headroom_sidecar.controlplane.evalsets import EvalSettings
from headroom_sidecar.controlplane.loop import (ControlLoop, IdentityError, LoopError, LoopSettings, PlanRequest, Policies,
                               operator_actor)
from headroom_sidecar.controlplane.planner import PlannerSettings, QualityBudget
from headroom_sidecar.controlplane.plans import IllegalTransition, PlanStatus, PlanStore, plan_diff
from headroom_sidecar.controlplane.policy import PolicySettings
from headroom_sidecar.controlplane.rollout import Fleet, Rollout, RolloutSettings
from headroom_sidecar.controlplane.trials import TrialClient
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc

log = logging.getLogger("headroom_sidecar.controlplane.admin")

DEFAULT_ADDRESS = "127.0.0.1:50051"


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
_NUMBER = (int, float)


def _arg(args: Mapping, name: str, kind, required: bool = False, default=None):
    """args[name] checked against kind; a clear INVALID_ARGUMENT otherwise."""
    if name not in args or args[name] is None:
        if required:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"argument {name!r} is required")
        return default
    value = args[name]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in
                                          (kind if isinstance(kind, tuple) else (kind,)))
    if not ok or (isinstance(value, str) and required and not value.strip()):
        want = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AdminError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"argument {name!r}: expected {want}, got {value!r}")
    return value


def _only(args: Mapping, command: str, allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise AdminError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{command}: unknown argument(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(allowed)) or 'none'}")


def _budget(value: Any) -> QualityBudget:
    if value is None:
        return QualityBudget()
    if not isinstance(value, dict):
        raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, "argument 'budget': expected an object")
    names = {f.name for f in dataclasses.fields(QualityBudget)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"argument 'budget': unknown field(s) "
                         f"{', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for k, v in value.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, _NUMBER)
                              or not math.isfinite(v)):
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"argument 'budget.{k}': expected a number, got {v!r}")
    return dataclasses.replace(QualityBudget(), **value)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):   # str enums
        return value.value
    return value


# ---------------------------------------------------------------------- the handlers
class ControlPlane:
    """Everything the Admin RPC acts on, built once per server over the store's DuckDB file."""

    def __init__(self, store, state, settings: Optional[ControlSettings] = None):
        self.settings = settings or ControlSettings()
        self.store, self.state = store, state
        self._con, lock = store.control_cursor()
        self.plans = PlanStore(self._con, lock)
        self.audit = AuditLog(self._con, lock)
        self.policies = Policies(self.settings.policy.folder)
        if self.policies.store is None:
            log.error("policy set %s did not load; plans cannot be decided until "
                      "policy.reload succeeds: %s", self.policies.folder,
                      "; ".join(self.policies.problems))
        self.client = TrialClient(state)
        self.fleet = Fleet(store, state)
        self.rollout = Rollout(self.plans, self.audit, self.client, self.fleet,
                               self.settings.rollout)
        self.loop = ControlLoop(store, state, self.plans, self.audit, self.policies, self.client,
                                self.rollout, self.settings.loop, self.settings.eval,
                                self.settings.planner)
        self._commands: dict[str, Callable[[dict, str], Any]] = {
            "agents.list": self.agents_list, "plan.list": self.plan_list,
            "plan.show": self.plan_show, "plan.trigger": self.plan_trigger,
            "plan.status": self.plan_status, "plan.approve": self.plan_approve,
            "plan.reject": self.plan_reject, "plan.rollback": self.plan_rollback,
            "audit.list": self.audit_list, "audit.verify": self.audit_verify,
            "policy.reload": self.policy_reload, "policy.show": self.policy_show,
            "analysis.summary": self.analysis_summary, "agents.unbind": self.agents_unbind}

    def close(self) -> None:
        self.loop.close()
        self._con.close()

    # ------------------------------------------------------------------ dispatch
    def handle(self, command: str, args: Any, actor: str = "") -> Any:
        """The JSON-ready result of one command, or AdminError."""
        handler = self._commands.get(command)
        if handler is None:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown command {command!r}; "
                             f"known: {', '.join(sorted(self._commands))}")
        if not isinstance(args, dict):
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{command}: args_json must be a JSON object, got {type(args).__name__}")
        try:
            return _jsonable(handler(args, actor))
        except AdminError:
            raise
        except IdentityError as e:
            raise AdminError(grpc.StatusCode.UNAUTHENTICATED, f"{command}: {e}") from None
        except KeyError as e:
            raise AdminError(grpc.StatusCode.NOT_FOUND, f"{command}: {e.args[0]}") from None
        except (LoopError, IllegalTransition) as e:
            raise AdminError(grpc.StatusCode.FAILED_PRECONDITION, f"{command}: {e}") from None
        except (ValueError, TypeError) as e:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"{command}: {e}") from None

    def rpc(self, raw: bytes, context: grpc.ServicerContext,
            principal: Optional[Principal] = None) -> pb.AdminReply:
        """The gRPC method: raw AdminRequest bytes in, AdminReply or an error status out.
        principal: who the server authenticated; their role must cover the command
        (controlplane.auth.COMMAND_ROLES) and they, not request.actor, are the audit actor."""
        try:
            request = pb.AdminRequest.FromString(raw)
            actor = request.actor
            if principal is not None:
                authorize_command(principal, request.command)
                actor = self._actor(principal, request)
            args = json.loads(request.args_json) if request.args_json.strip() else {}
            result = self.handle(request.command, args, actor)
            return pb.AdminReply(result_json=json.dumps(result, sort_keys=True, allow_nan=False))
        except AuthError as e:
            context.abort(e.code, e.message)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse AdminRequest: {e}")
        except json.JSONDecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"args_json is not JSON: line "
                          f"{e.lineno}, column {e.colno}: {e.msg}")
        except AdminError as e:
            context.abort(e.code, e.message)

    @staticmethod
    def _actor(principal: Principal, request: pb.AdminRequest) -> str:
        actor = principal.audit_actor(request.actor)
        typed = request.actor.strip()
        if principal.kind is PrincipalKind.OPERATOR and typed and typed not in \
                (principal.subject, actor):
            log.info("%s: client named itself %r; recorded as %s (its credential)",
                     request.command, request.actor, actor)
        return actor

    # ------------------------------------------------------------------ agents and plans
    def agents_unbind(self, args: dict, actor: str) -> dict:
        """Releases an agent id's certificate binding (a re-issued certificate may then claim it)."""
        _only(args, "agents.unbind", {"agent_id"})
        agent_id = _arg(args, "agent_id", str, required=True)
        bindings = getattr(self.state, "bindings", None)
        released = bool(bindings and bindings.unbind(agent_id))
        self.audit.append(AuditKind.NOTE, operator_actor(actor), agent_id,
                          {"event": "agent_unbound", "released": released})
        return {"agent_id": agent_id, "released": released}

    def agents_list(self, args: dict, actor: str) -> list[dict]:
        _only(args, "agents.list", set())
        live = set(self.state.connected_agents())
        with self.store.reader() as cur:
            cur.execute("SELECT agent_id, fingerprint, model_name, architecture, num_layers, "
                        "num_heads, hostname, pid, agent_version, last_seen FROM agents "
                        "ORDER BY agent_id")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        return [{**r, "connected": r["agent_id"] in live} for r in rows]

    def analysis_summary(self, args: dict, actor: str) -> dict:
        """What the traces say: least used heads, lowest-influence layers, sparsest MLPs,
        latency per query class; narrowed to one agent and/or one model fingerprint."""
        _only(args, "analysis.summary", {"agent_id", "fingerprint", "limit"})
        scope = {"agent_id": _arg(args, "agent_id", str),
                 "fingerprint": _arg(args, "fingerprint", str)}
        limit = _arg(args, "limit", int, default=10)
        with self.store.reader() as cur:
            return {"least_used_heads": analysis.least_used_heads(cur, limit=limit, **scope),
                    "lowest_influence_layers": analysis.lowest_influence_layers(
                        cur, limit=limit, **scope),
                    "sparsest_mlps": analysis.sparsest_mlps(cur, limit=limit, **scope),
                    "latency_by_query_class": analysis.latency_by_query_class(cur, **scope)}

    def plan_list(self, args: dict, actor: str) -> list[dict]:
        _only(args, "plan.list", {"status", "fingerprint", "limit"})
        status = _arg(args, "status", str)
        records = self.plans.list(status=PlanStatus(status) if status else None,
                                  fingerprint=_arg(args, "fingerprint", str),
                                  limit=_arg(args, "limit", int, default=100))
        return [{"plan_id": r.plan_id, "version": r.version, "status": r.status.value,
                 "fingerprint": r.fingerprint, "query_classes": list(r.query_classes),
                 "sha256": r.sha256, "proposed_by": r.proposed_by, "notes": r.doc.get("notes", ""),
                 "updated_at_us": r.updated_at_us} for r in records]

    def plan_show(self, args: dict, actor: str) -> dict:
        _only(args, "plan.show", {"plan_id"})
        plan_id = _arg(args, "plan_id", str, required=True)
        history = self.plans.history(plan_id)
        facts = self.fleet.model_facts(history.plan.fingerprint)
        diff = plan_diff(history.plan.doc, facts) if facts else \
            ["(model facts unknown: no agent with this fingerprint has registered)"]
        return {"plan": history.plan, "doc": history.plan.doc, "diff": diff,
                "trials": history.trials, "decisions": history.decisions,
                "applications": history.applications, "history": history.transitions,
                "running_on": self.rollout.running_on(plan_id)}

    def plan_trigger(self, args: dict, actor: str) -> dict:
        _only(args, "plan.trigger", {"agent_id", "fingerprint", "query_class", "max_trials",
                                     "budget", "eval", "tenant", "route", "requires_determinism"})
        if not args.get("agent_id") and not args.get("fingerprint"):
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT,
                             "plan.trigger: give 'agent_id' or 'fingerprint'")
        max_trials = _arg(args, "max_trials", int)
        if max_trials is not None and max_trials < 1:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"argument 'max_trials': must be >= 1, got {max_trials}")
        request = PlanRequest(
            agent_id=_arg(args, "agent_id", str), fingerprint=_arg(args, "fingerprint", str),
            query_class=_arg(args, "query_class", str), max_trials=max_trials,
            budget=_budget(args.get("budget")), eval=_arg(args, "eval", dict, default={}),
            tenant=_arg(args, "tenant", str, default=""), route=_arg(args, "route", str, default=""),
            requires_determinism=_arg(args, "requires_determinism", bool, default=False))
        who = operator_actor(actor) if actor else "planner"
        job = self.loop.trigger(request, actor=who)
        self.audit.append(AuditKind.NOTE, who, job.job_id, {
            "event": "planning_started", "fingerprint": job.fingerprint, "agent_id": job.agent_id,
            "query_class": job.query_class, "max_trials": max_trials})
        return job.to_dict()

    def plan_status(self, args: dict, actor: str) -> Any:
        _only(args, "plan.status", {"job_id"})
        job_id = _arg(args, "job_id", str)
        if job_id:
            return self.loop.job(job_id).to_dict()
        return [j.to_dict() for j in self.loop.jobs()]

    def plan_approve(self, args: dict, actor: str) -> dict:
        plan_id, reason = self._operator_args("plan.approve", args)
        return self.loop.approve(plan_id, actor, reason).to_dict()

    def plan_reject(self, args: dict, actor: str) -> dict:
        plan_id, reason = self._operator_args("plan.reject", args)
        return self.loop.reject(plan_id, actor, reason)

    def plan_rollback(self, args: dict, actor: str) -> dict:
        plan_id, reason = self._operator_args("plan.rollback", args)
        return self.loop.rollback(plan_id, actor, reason)

    def _operator_args(self, command: str, args: dict) -> tuple[str, str]:
        _only(args, command, {"plan_id", "reason"})
        return _arg(args, "plan_id", str, required=True), _arg(args, "reason", str, required=True)

    # ------------------------------------------------------------------ audit and policy
    def audit_list(self, args: dict, actor: str) -> list[dict]:
        _only(args, "audit.list", {"kind", "subject", "actor", "text", "after_seq", "limit",
                                   "oldest_first"})
        kind = _arg(args, "kind", str)
        if kind is not None and kind not in AuditKind.__members__:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"argument 'kind': unknown audit "
                             f"kind {kind!r}; known: {', '.join(AuditKind.__members__)}")
        rows = self.audit.rows(kind=kind, subject=_arg(args, "subject", str),
                               actor=_arg(args, "actor", str), text=_arg(args, "text", str),
                               after_seq=_arg(args, "after_seq", int),
                               limit=_arg(args, "limit", int, default=100),
                               newest_first=not _arg(args, "oldest_first", bool, default=False))
        return [dataclasses.asdict(r) for r in rows]

    def audit_verify(self, args: dict, actor: str) -> dict:
        _only(args, "audit.verify", {"anchor"})
        anchor = _arg(args, "anchor", dict)
        if anchor is not None:
            try:   # {seq, row_hash, mac, keyed_since}: the anchor file's or verify's `head`
                anchor = AuditHead.from_dict(anchor)
            except ValueError as e:
                raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"argument {e}") from None
        result = self.audit.verify(anchor=anchor)
        return {**dataclasses.asdict(result), "head": dataclasses.asdict(self.audit.head())}

    def policy_reload(self, args: dict, actor: str) -> dict:
        _only(args, "policy.reload", set())
        result = self.policies.reload()
        shown = self.policies.show()
        self.audit.append(AuditKind.POLICY_RELOADED, operator_actor(actor) if actor else "admin",
                          self.policies.folder, {**result, "revision": shown.get("revision")})
        return {**result, "policy": shown}

    def policy_show(self, args: dict, actor: str) -> dict:
        _only(args, "policy.show", set())
        return self.policies.show()


# ---------------------------------------------------------------------- the client
class AdminClient:
    """Calls the Admin RPC; raises grpc.RpcError with the server's status and message."""

    def __init__(self, address: str = DEFAULT_ADDRESS, actor: str = "", timeout_s: float = 60.0,
                 credentials: Optional[ClientCredentials] = None):
        """credentials: None = from the environment (HEADROOM_TLS_CA, HEADROOM_TLS_CERT,
        HEADROOM_TLS_KEY, HEADROOM_TOKEN, HEADROOM_LOCAL_TOKEN). `actor` only names a local
        caller; an authenticated server records the credential's name instead."""
        self.actor, self.timeout_s = actor, timeout_s
        credentials = credentials or ClientCredentials.resolve()
        self._channel = credentials.channel(address)
        self._stub = headroom_pb2_grpc.HeadroomStub(self._channel)

    def call(self, command: str, args: Optional[dict] = None, actor: Optional[str] = None) -> Any:
        reply = self._stub.Admin(pb.AdminRequest(command=command,
                                                 args_json=json.dumps(args or {}),
                                                 actor=self.actor if actor is None else actor),
                                 timeout=self.timeout_s)
        return json.loads(reply.result_json)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
