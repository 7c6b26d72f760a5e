"""The agent's edge with proto/: its dataclasses <-> headroom.v1 messages, nothing else.

Everything past this module works with plain dataclasses; only the exporter's worker thread
calls in here, so building messages never runs on the model's hot path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from headroom_sidecar.agent.fingerprint import ModelInfo
from headroom_sidecar.agent.records import GpuSample, RequestRecord, to_tables
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.columnar import encode_table

AGENT_VERSION = "0.1.0"


@dataclass(frozen=True)
class ExportCounters:
    """What the exporter did, cumulative since it started.

    Accounting: enqueued = dropped + rejected + sent + queue_len (+ the batch being built);
    sent = acked + lost + in flight (in flight includes batches kept for a resend). `lost` are
    records of batches the control plane refused (ErrorReply) or that a broken stream left
    unacked past the exporter's resend bound; the other unacked ones are resent after the
    reconnect (`resent_*`, counted per resend) with their original seq, and the control plane
    stores a (agent, pid, seq) once, so no row is stored twice.
    """
    enqueued_records: int = 0
    dropped_records: int = 0      # the bounded queue was full: the oldest went
    rejected_records: int = 0     # could not be encoded (malformed record); logged
    sent_records: int = 0         # written to a stream inside a batch
    acked_records: int = 0        # in batches the control plane acknowledged
    lost_records: int = 0         # in batches that failed in flight
    sent_batches: int = 0
    acked_batches: int = 0
    failed_batches: int = 0
    acked_rows: int = 0           # rows_stored summed over acks (all tables)
    server_rejected_rows: int = 0  # rows_rejected summed over acks: refused, not stored
    reconnects: int = 0           # successful connections after the first
    connect_failures: int = 0
    queue_len: int = 0
    gpu_enqueued: int = 0
    gpu_dropped: int = 0
    heartbeats: int = 0
    resent_batches: int = 0       # unacked batches sent again on a new stream
    resent_records: int = 0
    connected: bool = False


# ------------------------------------------------------------------ control plane -> agent
@dataclass(frozen=True)
class PlanMessage:
    plan_id: str
    version: int
    document_json: str
    sha256: str
    signature: bytes = b""   # Ed25519 by the control plane (agent/verify.py checks it)
    key_id: str = ""


@dataclass(frozen=True)
class ApplyPlan:
    plan: PlanMessage


@dataclass(frozen=True)
class TrialRequest:
    trial_id: str
    plan: PlanMessage
    eval_json: str


@dataclass(frozen=True)
class Rollback:
    plan_id: str
    reason: str


ControlCommand = Union[ApplyPlan, TrialRequest, Rollback]


# ------------------------------------------------------------------ agent -> control plane
class PlanState:
    """Mirrors pb.PlanStatus.State; kept as ints so the mapping is the proto's own."""
    APPLIED = pb.PlanStatus.APPLIED
    FAILED = pb.PlanStatus.FAILED
    ROLLED_BACK = pb.PlanStatus.ROLLED_BACK
    REFUSED = pb.PlanStatus.REFUSED


@dataclass(frozen=True)
class PlanStatusReport:
    plan_id: str
    sha256: str
    state: int          # a PlanState value
    detail: str = ""


@dataclass(frozen=True)
class TrialResultReport:
    trial_id: str
    evidence_json: str = ""
    error: str = ""


Reply = Union[PlanStatusReport, TrialResultReport]


# ------------------------------------------------------------------ conversions
def model_info_to_pb(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**dataclasses.asdict(info))


def make_hello(agent_id: str, model: Optional[ModelInfo], gpu_status: str,
               settings: AgentSettings) -> pb.AgentHello:
    hello = pb.AgentHello(agent_id=agent_id, hostname=socket.gethostname(), pid=os.getpid(),
                          agent_version=AGENT_VERSION, gpu_status=gpu_status,
                          settings_json=json.dumps(dataclasses.asdict(settings), sort_keys=True))
    if model is not None:
        hello.model.CopyFrom(model_info_to_pb(model))
    return hello


def counters_to_pb(c: ExportCounters) -> pb.ExportCounters:
    # The proto's dropped_records is "lost to the agent's queue"; lost in flight is reported
    # through failed_batches (no per-record field for it in the contract yet).
    return pb.ExportCounters(
        enqueued_records=c.enqueued_records, dropped_records=c.dropped_records,
        sent_records=c.sent_records, sent_batches=c.sent_batches,
        failed_batches=c.failed_batches, reconnects=c.reconnects,
        queue_len=min(c.queue_len, 2**32 - 1))


def now_us() -> int:
    return time.time_ns() // 1000


def batch_to_pb(seq: int, records: Sequence[RequestRecord], gpu: Sequence[GpuSample],
                counters: ExportCounters) -> pb.TelemetryBatch:
    """One TelemetryBatch: every table of to_tables() column-encoded (raises on bad records)."""
    tables = to_tables(records, gpu)
    batch = pb.TelemetryBatch(seq=seq, sent_at_us=now_us())
    for name, columns in tables.columns.items():
        batch.tables.append(encode_table(name, columns))
    batch.counters.CopyFrom(counters_to_pb(counters))
    return batch


def batch_message(agent_id: str, batch: pb.TelemetryBatch) -> pb.AgentMessage:
    return pb.AgentMessage(agent_id=agent_id, batch=batch)


def hello_message(hello: pb.AgentHello) -> pb.AgentMessage:
    return pb.AgentMessage(agent_id=hello.agent_id, hello=hello)


def heartbeat_message(agent_id: str, counters: ExportCounters) -> pb.AgentMessage:
    hb = pb.Heartbeat(counters=counters_to_pb(counters), sent_at_us=now_us())
    return pb.AgentMessage(agent_id=agent_id, heartbeat=hb)


def reply_message(agent_id: str, reply: Reply) -> pb.AgentMessage:
    if isinstance(reply, PlanStatusReport):
        status = pb.PlanStatus(plan_id=reply.plan_id, sha256=reply.sha256,
                               state=reply.state, detail=reply.detail)
        return pb.AgentMessage(agent_id=agent_id, plan_status=status)
    if isinstance(reply, TrialResultReport):
        result = pb.TrialResult(trial_id=reply.trial_id, evidence_json=reply.evidence_json,
                                error=reply.error)
        return pb.AgentMessage(agent_id=agent_id, trial_result=result)
    raise TypeError(f"reply_message: unsupported reply type {type(reply).__name__}")


def _plan_from_pb(p: pb.Plan) -> PlanMessage:
    return PlanMessage(plan_id=p.plan_id, version=p.version, document_json=p.document_json,
                       sha256=p.sha256, signature=p.signature, key_id=p.key_id)


def command_from_pb(msg: pb.ControlMessage) -> Optional[ControlCommand]:
    """The command a ControlMessage carries; None for acks, errors and empty messages."""
    kind = msg.WhichOneof("body")
    if kind == "apply_plan":
        return ApplyPlan(_plan_from_pb(msg.apply_plan))
    if kind == "trial":
        return TrialRequest(msg.trial.trial_id, _plan_from_pb(msg.trial.plan), msg.trial.eval_json)
    if kind == "rollback":
        return Rollback(msg.rollback.plan_id, msg.rollback.reason)
    return None


def default_agent_id(settings: AgentSettings) -> str:
    """settings.agent_id, else host-pid-random: unique per process, readable in the dashboard."""
    if settings.agent_id:
        return settings.agent_id
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
