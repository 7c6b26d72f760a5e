"""The Admin client: one typed method per Admin RPC of service Headroom (proto/headroom.proto).

    with AdminClient("127.0.0.1:50051", actor="alice") as admin:
        for plan in admin.list_plans(status="needs_human").plans: ...
        job = admin.approve_plan("plan-1", reason="looks good")

Methods return the reply messages; `as_dict` turns one into JSON-ready dicts (the CLI's output,
the dashboard's tables). Errors are grpc.RpcError with the server's status and message.
Who acts: an authenticated server records the credential's name; a local caller (loopback,
no TLS) names itself with `actor`, sent as the ACTOR_METADATA call metadata.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from headroom_sidecar.proto.credentials import ClientCredentials

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Call metadata naming a local caller; ignored by the server for authenticated callers.
ACTOR_METADATA = "headroom-actor"
# Fields holding an opaque JSON document; as_dict decodes them under the name without it.
JSON_SUFFIX = "_json"


def check_actor(actor: str) -> str:
    """actor as gRPC metadata can carry it (printable ASCII); ValueError otherwise."""
    if not all(" " <= c <= "~" for c in actor):
        raise ValueError(f"actor {actor!r}: gRPC metadata takes printable ASCII only")
    return actor


class AdminClient:
    """Calls the Admin RPCs; thread-safe (one channel, gRPC stubs are)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, actor: str = "", timeout_s: float = 60.0,
                 credentials: Optional[ClientCredentials] = None):
        """credentials: None = from the environment (HEADROOM_TLS_CA, HEADROOM_TLS_CERT,
        HEADROOM_TLS_KEY, HEADROOM_TOKEN, HEADROOM_LOCAL_TOKEN)."""
        self.actor, self.timeout_s = check_actor(actor), timeout_s
        credentials = credentials or ClientCredentials.resolve()
        self._channel = credentials.channel(address)
        self._stub = headroom_pb2_grpc.HeadroomStub(self._channel)

    def _call(self, rpc, request: Message, actor: Optional[str] = None) -> Message:
        who = check_actor(self.actor if actor is None else actor)
        metadata = ((ACTOR_METADATA, who),) if who else None
        return rpc(request, timeout=self.timeout_s, metadata=metadata)

    # ------------------------------------------------------------------ agents and analysis
    def list_agents(self) -> pb.ListAgentsReply:
        return self._call(self._stub.ListAgents, pb.ListAgentsRequest())

    def unbind_agent(self, agent_id: str, actor: Optional[str] = None) -> pb.UnbindAgentReply:
        return self._call(self._stub.UnbindAgent, pb.UnbindAgentRequest(agent_id=agent_id), actor)

    def analysis_summary(self, agent_id: str = "", fingerprint: str = "",
                         limit: Optional[int] = None) -> pb.AnalysisReply:
        request = pb.AnalysisRequest(agent_id=agent_id, fingerprint=fingerprint, limit=limit)
        return self._call(self._stub.AnalysisSummary, request)

    # ------------------------------------------------------------------ plans and jobs
    def list_plans(self, status: str = "", fingerprint: str = "",
                   limit: Optional[int] = None) -> pb.ListPlansReply:
        request = pb.ListPlansRequest(status=status, fingerprint=fingerprint, limit=limit)
        return self._call(self._stub.ListPlans, request)

    def show_plan(self, plan_id: str) -> pb.ShowPlanReply:
        return self._call(self._stub.ShowPlan, pb.ShowPlanRequest(plan_id=plan_id))

    def trigger_plan(self, agent_id: str = "", fingerprint: str = "", query_class: str = "",
                     max_trials: Optional[int] = None, budget: Optional[Mapping[str, float]] = None,
                     eval: Optional[Mapping[str, Any]] = None, tenant: str = "", route: str = "",
                     requires_determinism: bool = False, actor: Optional[str] = None) -> pb.Job:
        """budget: QualityBudget fields (min_top1, max_ppl_ratio, ...); eval: eval-set overrides."""
        request = pb.TriggerPlanRequest(
            agent_id=agent_id, fingerprint=fingerprint, query_class=query_class,
            max_trials=max_trials, budget=pb.QualityBudget(**(budget or {})),
            eval_json=json.dumps(eval) if eval is not None else "", tenant=tenant, route=route,
            requires_determinism=requires_determinism)
        return self._call(self._stub.TriggerPlan, request, actor)

    def get_job(self, job_id: str) -> pb.Job:
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def list_jobs(self) -> pb.ListJobsReply:
        return self._call(self._stub.ListJobs, pb.ListJobsRequest())

    def approve_plan(self, plan_id: str, reason: str, actor: Optional[str] = None) -> pb.Job:
        """The rollout job that applies the plan (canary, then fleet)."""
        return self._call(self._stub.ApprovePlan, _verdict(plan_id, reason), actor)

    def reject_plan(self, plan_id: str, reason: str,
                    actor: Optional[str] = None) -> pb.RejectPlanReply:
        return self._call(self._stub.RejectPlan, _verdict(plan_id, reason), actor)

    def rollback_plan(self, plan_id: str, reason: str,
                      actor: Optional[str] = None) -> pb.RollbackPlanReply:
        return self._call(self._stub.RollbackPlan, _verdict(plan_id, reason), actor)

    # ------------------------------------------------------------------ audit and policy
    def list_audit(self, kind: str = "", subject: str = "", actor_filter: str = "",
                   text: str = "", after_seq: Optional[int] = None, limit: Optional[int] = None,
                   oldest_first: bool = False) -> pb.ListAuditReply:
        """actor_filter: only rows by this actor (named so, as `actor` names the caller)."""
        request = pb.ListAuditRequest(kind=kind, subject=subject, actor=actor_filter, text=text,
                                      after_seq=after_seq, limit=limit, oldest_first=oldest_first)
        return self._call(self._stub.ListAudit, request)

    def verify_audit(self, anchor: Optional[Mapping[str, Any]] = None) -> pb.VerifyAuditReply:
        """anchor: {seq, row_hash, mac, keyed_since}, as an earlier verify's `head` spells it."""
        request = pb.VerifyAuditRequest(anchor=pb.AuditAnchor(**anchor)) if anchor is not None \
            else pb.VerifyAuditRequest()
        return self._call(self._stub.VerifyAudit, request)

    def show_policy(self) -> pb.PolicySet:
        return self._call(self._stub.ShowPolicy, pb.ShowPolicyRequest())

    def reload_policy(self, actor: Optional[str] = None) -> pb.ReloadPolicyReply:
        return self._call(self._stub.ReloadPolicy, pb.ReloadPolicyRequest(), actor)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _verdict(plan_id: str, reason: str) -> pb.PlanVerdictRequest:
    return pb.PlanVerdictRequest(plan_id=plan_id, reason=reason)


# ---------------------------------------------------------------------- replies as dicts
def reply_json(reply: Message) -> Any:
    """as_dict, except that a reply holding only a list (plans, audit rows, jobs, agents) is
    that list: what the CLI prints and the dashboard's pages read."""
    fields = reply.DESCRIPTOR.fields
    doc = as_dict(reply)
    return doc[fields[0].name] if len(fields) == 1 and fields[0].is_repeated else doc


def as_dict(message: Message) -> dict:
    """A reply as JSON-ready dicts under the proto field names: every field present, an unset
    optional field (or message) None, NaN None, each *_json document decoded ("" -> None)
    under the name without the suffix, maps as dicts."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        name = field.name
        if field.has_presence and not field.is_repeated and not message.HasField(name):
            out[name.removesuffix(JSON_SUFFIX)] = None
        elif field.type == FieldDescriptor.TYPE_STRING and name.endswith(JSON_SUFFIX):
            out[name.removesuffix(JSON_SUFFIX)] = json.loads(value) if value else None
        else:
            out[name] = _plain(field, value)
    return out


def _plain(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {k: _scalar(value_field, v) for k, v in value.items()}
    if field.is_repeated:
        return [_scalar(field, v) for v in value]
    return _scalar(field, value)


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return as_dict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
