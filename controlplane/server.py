"""The `Headroom` gRPC service: agents stream telemetry in, clients query the store read-only.

Each Connect stream has a reader thread (parses, stores, acks) and an outbound queue that the
gRPC handler drains, so the control plane can push plans and trial requests to a connected agent
at any time through `ServerState.send_to_agent`. Requests arrive as raw bytes and are parsed
here, so a malformed message gets an ErrorReply instead of tearing the stream down.
"""
from __future__ import annotations

import enum
import logging
import queue
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import grpc
from google.protobuf.message import DecodeError

from headroom_sidecar.controlplane.auth import (QUERY_ROLE, AgentBindings, AuthError, AuthMode, Principal,
                               PrincipalKind, ServerAuth, require_role)
from headroom_sidecar.controlplane.health import HealthSettings, StoreHealth, add_health
from headroom_sidecar.controlplane.ingest import DecodedBatch, ErrorCode, IngestError, IngestWriter, decode_batch
from headroom_sidecar.controlplane.query import QueryError, QueryErrorKind, encode_result, run_query
from headroom_sidecar.controlplane.metrics import observe_server, unobserve_server
from headroom_sidecar.controlplane.retention import RetentionSettings, RetentionWorker
from headroom_sidecar.controlplane.schema import COUNTER_COLUMNS, MODEL_COLUMNS
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.controlplane.store import BatchJob, Counters, Registration, Store, StoreError
from headroom_sidecar.proto import headroom_pb2 as pb

if TYPE_CHECKING:
    from headroom_sidecar.controlplane.admin import ControlSettings

log = logging.getLogger("headroom_sidecar.controlplane.server")

SERVICE_NAME = "headroom.v1.Headroom"
_POLL_S = 0.2   # how often a blocked queue operation looks at whether its stream is still alive


class InboundKind(enum.Enum):
    """Agent messages other components subscribe to (AgentMessage oneof field names)."""
    PLAN_STATUS = "plan_status"
    TRIAL_RESULT = "trial_result"
    HELLO = "hello"   # after registration: the agent's active plan settles a restart's rollouts


# callback(agent_id, message): message is pb.PlanStatus, pb.TrialResult or pb.AgentHello.
InboundCallback = Callable[[str, object], None]


# ---------------------------------------------------------------------- proto -> plain types
def registration_from_hello(agent_id: str, hello: pb.AgentHello) -> Registration:
    model = {f: getattr(hello.model, f) for f in MODEL_COLUMNS} if hello.HasField("model") else {}
    return Registration(agent_id=agent_id, model=model, hostname=hello.hostname, pid=hello.pid,
                        agent_version=hello.agent_version, gpu_status=hello.gpu_status,
                        settings_json=hello.settings_json)


def counters_from_proto(msg, has: bool) -> Optional[Counters]:
    return Counters(**{c: getattr(msg, c) for c in COUNTER_COLUMNS}) if has else None


def _error(code: ErrorCode, message: str) -> pb.ControlMessage:
    return pb.ControlMessage(error=pb.ErrorReply(code=code.value, message=message))


# ---------------------------------------------------------------------- one agent stream
@dataclass(eq=False)
class _Session:
    context: grpc.ServicerContext
    outbound: queue.Queue
    agent_id: Optional[str] = None
    pid: int = 0
    principal: Optional[Principal] = None
    # monotonic time by which hello must have arrived; the stream is closed after it.
    hello_by_s: float = float("inf")
    hello_expired: bool = False
    ended: threading.Event = field(default_factory=threading.Event)
    # Jobs handed to the writer and not yet answered: the stream stays open until they are.
    _pending: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)

    def job_started(self) -> None:
        with self._idle:
            self._pending += 1

    def job_done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def wait_idle(self) -> None:
        """Until every job of this stream is answered, or the client is gone."""
        with self._idle:
            while self._pending and self.context.is_active():
                self._idle.wait(_POLL_S)

    def alive(self) -> bool:
        return not self.ended.is_set() and self.context.is_active()

    def put(self, msg: pb.ControlMessage) -> bool:
        """Never blocks: acks and errors are bounded by the batches the writer holds."""
        if not self.alive():
            return False
        self.outbound.put(msg)
        return True

    def drain(self) -> Iterator[pb.ControlMessage]:
        """What the gRPC handler yields: queued messages until the stream ends and the queue is empty."""
        while True:
            try:
                yield self.outbound.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.alive():
                    return
                if self.agent_id is None and time.monotonic() >= self.hello_by_s:
                    self.hello_expired = True
                    self.ended.set()
                    return


@dataclass
class IngestStats:
    batches: int = 0
    rows: int = 0
    bytes: int = 0
    duplicates: int = 0
    errors: int = 0


class ServerState:
    """Connected agents, their outbound queues, and callbacks for what they report."""

    def __init__(self, store: Store, settings: ServerSettings, writer: IngestWriter):
        self.store = store
        self.settings = settings
        self.writer = writer
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._callbacks: dict[InboundKind, list[InboundCallback]] = {k: [] for k in InboundKind}
        self._readers: set[threading.Thread] = set()
        self.control = None   # controlplane.admin.ControlPlane, set by start_server
        self.auth: Optional[ServerAuth] = None        # set by start_server
        self.bindings: Optional[AgentBindings] = None  # TLS: agent id -> certificate
        # Open Connect streams, in all and per authenticated agent certificate.
        self._agent_streams = 0
        self._streams_by_client: dict[str, int] = {}
        self._operator_calls = threading.BoundedSemaphore(settings.max_operator_calls)

    # ------------------------------------------------------------------ public API
    def send_to_agent(self, agent_id: str, message: pb.ControlMessage) -> bool:
        """Queues `message` for the agent's stream; False if it is not connected, or if
        outbound_queue_max messages already wait for an agent that does not read them."""
        with self._lock:
            session = self._sessions.get(agent_id)
        if session is None or session.outbound.qsize() >= self.settings.outbound_queue_max:
            return False
        return session.put(message)

    def connected_agents(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def verified_agents(self) -> list[str]:
        """Connected agents whose identity the server checked: a certificate naming the agent
        id, or a caller the local (loopback) mode trusts. Only these may be canaries."""
        with self._lock:
            return sorted(a for a, s in self._sessions.items() if _verified(s, a))

    def on(self, kind: InboundKind, callback: InboundCallback) -> None:
        """Calls `callback(agent_id, message)` for every message of `kind`, on the stream's reader."""
        with self._lock:
            self._callbacks[kind].append(callback)

    # ------------------------------------------------------------------ internals
    def _dispatch(self, kind: InboundKind, agent_id: str, message) -> None:
        with self._lock:
            callbacks = list(self._callbacks[kind])
        if not callbacks:
            log.warning("agent %s sent %s; nothing is subscribed to it", agent_id, kind.value)
        for callback in callbacks:
            try:
                callback(agent_id, message)
            except Exception:   # one faulty subscriber must not cut the agent's stream
                log.exception("callback for %s from agent %s failed", kind.value, agent_id)

    def _attach(self, session: _Session) -> bool:
        """False if another principal holds a stream for the agent id (no takeover); a
        reconnect of the same principal replaces its own session."""
        with self._lock:
            previous = self._sessions.get(session.agent_id)
            if previous is not None and not _same_principal(previous, session):
                return False
            self._sessions[session.agent_id] = session
        if previous is not None:
            log.warning("agent %s connected again; the newer stream takes over", session.agent_id)
        return True

    # ------------------------------------------------------------------ resource limits
    def open_agent_stream(self, principal: Principal) -> Optional[str]:
        """Counts a new Connect stream; why not if a limit is reached (then nothing is counted)."""
        key = principal.client_key if principal.kind is PrincipalKind.AGENT else None
        with self._lock:
            if self._agent_streams >= self.settings.max_agent_streams:
                return (f"{self._agent_streams} agent streams are open, the most "
                        f"max_agent_streams={self.settings.max_agent_streams} allows")
            if key is not None and self._streams_by_client.get(key, 0) >= \
                    self.settings.max_streams_per_client:
                return (f"agent {principal.subject!r} has {self._streams_by_client[key]} streams "
                        f"open, the most max_streams_per_client="
                        f"{self.settings.max_streams_per_client} allows")
            self._agent_streams += 1
            if key is not None:
                self._streams_by_client[key] = self._streams_by_client.get(key, 0) + 1
        return None

    def close_agent_stream(self, principal: Principal) -> None:
        key = principal.client_key if principal.kind is PrincipalKind.AGENT else None
        with self._lock:
            self._agent_streams -= 1
            if key is not None:
                left = self._streams_by_client.pop(key) - 1
                if left:
                    self._streams_by_client[key] = left

    def agent_streams(self) -> int:
        with self._lock:
            return self._agent_streams

    def operator_call(self) -> bool:
        """Takes one of the max_operator_calls slots; False if all are busy."""
        return self._operator_calls.acquire(blocking=False)

    def operator_call_done(self) -> None:
        self._operator_calls.release()

    def _detach(self, session: _Session) -> None:
        with self._lock:
            current = self._sessions.get(session.agent_id) is session
            if current:
                del self._sessions[session.agent_id]
        if current:
            self.store.set_connected(session.agent_id, False)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def end_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.ended.set()

    def join_readers(self, timeout_s: float) -> None:
        with self._lock:
            readers = list(self._readers)
        for reader in readers:
            reader.join(timeout_s)


def _verified(session: _Session, agent_id: str) -> bool:
    p = session.principal
    return p is not None and (p.kind is PrincipalKind.LOCAL or
                              (p.kind is PrincipalKind.AGENT and p.subject == agent_id))


def _same_principal(a: _Session, b: _Session) -> bool:
    pa, pb_ = a.principal, b.principal
    if pa is None or pb_ is None or pa.kind is PrincipalKind.LOCAL:
        return pa == pb_   # local trust: the machine's user may reconnect under any id
    return pa.kind == pb_.kind and pa.subject == pb_.subject and pa.cert_sha256 == pb_.cert_sha256


# ---------------------------------------------------------------------- the service
class HeadroomService:
    def __init__(self, state: ServerState):
        self.state = state
        self.store = state.store
        self.settings = state.settings

    def handler(self) -> grpc.GenericRpcHandler:
        # No request deserializer: the raw bytes come to us, so garbage gets a precise answer.
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.connect, response_serializer=pb.ControlMessage.SerializeToString),
            "Query": grpc.unary_unary_rpc_method_handler(
                self.query, response_serializer=pb.QueryReply.SerializeToString),
            "Admin": grpc.unary_unary_rpc_method_handler(
                self.admin, response_serializer=pb.AdminReply.SerializeToString),
        })

    # ------------------------------------------------------------------ Connect
    def connect(self, requests: Iterator[bytes], context: grpc.ServicerContext):
        principal = self._authenticate(context)
        if principal.kind is PrincipalKind.OPERATOR:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"operator {principal.subject!r} "
                          "cannot open an agent stream; agents present an agent certificate")
        refused = self.state.open_agent_stream(principal)
        if refused is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        release = _once(lambda: self.state.close_agent_stream(principal))
        context.add_callback(release)   # also when the client vanishes mid-stream
        session = _Session(context=context, outbound=queue.Queue(), principal=principal,
                           hello_by_s=time.monotonic() + self.settings.hello_timeout_s)
        context.add_callback(session.ended.set)
        reader = threading.Thread(target=self._read, args=(requests, session), daemon=True,
                                  name="headroom-connect-reader")
        with self.state._lock:
            self.state._readers.add(reader)
        reader.start()
        try:
            yield from session.drain()
        finally:
            release()
        if session.hello_expired:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within hello_timeout_s="
                          f"{self.settings.hello_timeout_s:g} s; the stream is closed")

    def _authenticate(self, context: grpc.ServicerContext) -> Principal:
        try:
            return self.state.auth.authenticate(context)
        except AuthError as e:
            context.abort(e.code, e.message)

    def _read(self, requests: Iterator[bytes], session: _Session) -> None:
        try:
            for raw in requests:
                if not self._handle(raw, session):
                    break
        except grpc.RpcError:
            pass   # the client went away; the finally below records it
        except Exception:
            log.exception("agent stream %s failed", session.agent_id)
            session.put(_error(ErrorCode.INTERNAL, "internal error; see the server log"))
        finally:
            self._close_session(session)

    def _close_session(self, session: _Session) -> None:
        session.wait_idle()
        try:
            if session.agent_id is not None:
                self.state._detach(session)
        except StoreError as e:
            log.warning("could not mark agent %s disconnected: %s", session.agent_id, e)
        finally:
            session.ended.set()
            with self.state._lock:
                self.state._readers.discard(threading.current_thread())

    def _handle(self, raw: bytes, session: _Session) -> bool:
        """Handles one message; False ends the stream."""
        try:
            msg = pb.AgentMessage.FromString(raw)
        except DecodeError as e:
            session.put(_error(ErrorCode.MALFORMED_MESSAGE,
                               f"cannot parse AgentMessage ({len(raw)} bytes): {e}"))
            self.state._count(errors=1)
            return session.agent_id is not None
        kind = msg.WhichOneof("body")
        if session.agent_id is None:
            return self._hello(msg, session) if kind == "hello" else self._no_hello(kind, session)
        if msg.agent_id and msg.agent_id != session.agent_id:
            session.put(_error(ErrorCode.AGENT_ID_MISMATCH,
                               f"message for agent {msg.agent_id!r} on the stream of "
                               f"{session.agent_id!r}; ignored"))
            return True
        handler = self._by_kind.get(kind, HeadroomService._empty)
        handler(self, msg, session)
        return True

    def _no_hello(self, kind: Optional[str], session: _Session) -> bool:
        session.put(_error(ErrorCode.HELLO_REQUIRED,
                           f"the first message of a stream must be hello, got {kind or 'nothing'}"))
        return False

    def _hello(self, msg: pb.AgentMessage, session: _Session) -> bool:
        agent_id = msg.hello.agent_id or msg.agent_id
        if not agent_id:
            session.put(_error(ErrorCode.AGENT_ID_REQUIRED, "hello without an agent_id"))
            return False
        if msg.agent_id and msg.hello.agent_id and msg.agent_id != msg.hello.agent_id:
            session.put(_error(ErrorCode.AGENT_ID_MISMATCH,
                               f"hello.agent_id={msg.hello.agent_id!r} but "
                               f"agent_id={msg.agent_id!r}"))
            return False
        refused = self._identity_problem(agent_id, session.principal, msg.hello.model.fingerprint)
        if refused is None:
            session.agent_id, session.pid = agent_id, msg.hello.pid
            if not self.state._attach(session):
                session.agent_id = None
                refused = (f"agent {agent_id!r} is connected with another identity; a second "
                           "stream cannot take it over")
        if refused is not None:
            log.warning("hello refused: %s", refused)
            session.put(_error(ErrorCode.AGENT_ID_MISMATCH, refused))
            self.state._count(errors=1)
            return False
        self.store.register_agent(registration_from_hello(agent_id, msg.hello))
        log.info("agent %s connected (%s pid %d)", agent_id, msg.hello.hostname, msg.hello.pid)
        self.state._dispatch(InboundKind.HELLO, agent_id, msg.hello)
        return True

    def _identity_problem(self, agent_id: str, principal: Principal,
                          fingerprint: str) -> Optional[str]:
        """Why this principal may not speak for agent_id, or None. A certificate names one agent
        id, and an agent id stays bound to the first certificate it connected with and the
        first model it registered."""
        if principal.kind is PrincipalKind.LOCAL:
            return None
        if principal.subject != agent_id:
            return (f"hello names agent {agent_id!r} but the certificate is for "
                    f"{principal.subject!r}")
        refused = self.state.bindings.bind(agent_id, principal.cert_sha256, fingerprint)
        if refused is not None:
            return f"{refused}; an admin can release it with the Admin command agents.unbind"
        return None

    def _batch(self, msg: pb.AgentMessage, session: _Session) -> None:
        batch = msg.batch
        try:
            decoded = decode_batch(batch, self.store.model_shape(session.agent_id))
        except IngestError as e:
            self.state._count(errors=1)
            session.put(e.reply())
            return
        job = BatchJob(session.agent_id, session.pid, decoded,
                       counters_from_proto(batch.counters, batch.HasField("counters")))
        self._submit(session, job, lambda outcome: self._stored(session, decoded, outcome))

    def _submit(self, session: _Session, job: BatchJob, done) -> None:
        def answered(outcome) -> None:
            try:
                done(outcome)
            finally:
                session.job_done()
        session.job_started()
        if not self.state.writer.submit(job, answered, alive=session.alive):
            session.job_done()

    def _stored(self, session: _Session, decoded: DecodedBatch, outcome) -> None:
        """On the writer thread: the batch's ack, or why it was not stored."""
        if isinstance(outcome, Exception):
            log.error("agent %s batch seq=%d: %s", session.agent_id, decoded.seq, outcome)
            self.state._count(errors=1)
            session.put(_error(ErrorCode.STORE_FAILED, str(outcome)))
            return
        self.state._count(batches=1, rows=outcome.rows_stored, bytes=decoded.num_bytes,
                          duplicates=int(outcome.duplicate))
        if decoded.rows_rejected:
            log.warning("agent %s batch seq=%d: %d row(s) rejected: %s", session.agent_id,
                        decoded.seq, decoded.rows_rejected, decoded.reject_reason)
        session.put(pb.ControlMessage(ack=pb.Ack(
            seq=decoded.seq, rows_stored=outcome.rows_stored, rows_rejected=decoded.rows_rejected,
            reject_reason=decoded.reject_reason)))

    def _heartbeat(self, msg: pb.AgentMessage, session: _Session) -> None:
        hb = msg.heartbeat
        # Through the writer, so counters are stored in the order the agent sent them;
        # without counters it still refreshes last_seen.
        job = BatchJob(session.agent_id, session.pid,
                       counters=counters_from_proto(hb.counters, hb.HasField("counters")))
        self._submit(session, job, lambda outcome: None)

    def _plan_status(self, msg: pb.AgentMessage, session: _Session) -> None:
        self.state._dispatch(InboundKind.PLAN_STATUS, session.agent_id, msg.plan_status)

    def _trial_result(self, msg: pb.AgentMessage, session: _Session) -> None:
        self.state._dispatch(InboundKind.TRIAL_RESULT, session.agent_id, msg.trial_result)

    def _duplicate_hello(self, msg: pb.AgentMessage, session: _Session) -> None:
        session.put(_error(ErrorCode.DUPLICATE_HELLO,
                           f"agent {session.agent_id!r} already said hello on this stream"))

    def _empty(self, msg: pb.AgentMessage, session: _Session) -> None:
        session.put(_error(ErrorCode.EMPTY_MESSAGE, "AgentMessage without a body"))

    _by_kind = {"batch": _batch, "heartbeat": _heartbeat, "plan_status": _plan_status,
                "trial_result": _trial_result, "hello": _duplicate_hello}

    # ------------------------------------------------------------------ Query
    def query(self, raw: bytes, context: grpc.ServicerContext) -> pb.QueryReply:
        principal = self._operator_gate(raw, context, "Query")
        try:
            require_role(principal, QUERY_ROLE, "Query")
            return self._query(raw, context)
        except AuthError as e:
            context.abort(e.code, e.message)
        finally:
            self.state.operator_call_done()

    def _operator_gate(self, raw: bytes, context: grpc.ServicerContext, what: str) -> Principal:
        """Authenticates a Query/Admin call and takes an operator slot (the caller releases it)."""
        principal = self._authenticate(context)
        if len(raw) > self.settings.max_operator_request_bytes:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} request of {len(raw)} "
                          f"bytes exceeds max_operator_request_bytes="
                          f"{self.settings.max_operator_request_bytes}")
        if not self.state.operator_call():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.settings.max_operator_calls}"
                          f" Query/Admin calls are running (max_workers - max_agent_streams); "
                          "retry shortly")
        return principal

    def _query(self, raw: bytes, context: grpc.ServicerContext) -> pb.QueryReply:
        try:
            request = pb.QueryRequest.FromString(raw)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse QueryRequest: {e}")
        max_rows = min(request.max_rows or self.settings.query_default_rows,
                       self.settings.query_max_rows)
        try:
            with self.store.reader() as cur:
                result = run_query(cur, request.sql, max_rows, self.settings.query_timeout_s)
            reply = pb.QueryReply(table=encode_result("result", result.table),
                                  truncated=result.truncated)
        except QueryError as e:
            context.abort(_STATUS_BY_KIND[e.kind], e.message)
        except StoreError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if reply.ByteSize() > self.settings.max_message_bytes:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"reply of {reply.ByteSize()} bytes exceeds max_message_bytes="
                          f"{self.settings.max_message_bytes}; ask for fewer rows (max_rows)")
        return reply


    # ------------------------------------------------------------------ Admin
    def admin(self, raw: bytes, context: grpc.ServicerContext) -> pb.AdminReply:
        principal = self._operator_gate(raw, context, "Admin")
        try:
            return self.state.control.rpc(raw, context, principal)
        finally:
            self.state.operator_call_done()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """fn, callable many times from any thread, run the first time only."""
    lock, done = threading.Lock(), [False]

    def call() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        fn()
    return call


_STATUS_BY_KIND = {QueryErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
                   QueryErrorKind.FAILED: grpc.StatusCode.INVALID_ARGUMENT,
                   QueryErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
                   QueryErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED}


# ---------------------------------------------------------------------- lifecycle
@dataclass
class RunningServer:
    server: grpc.Server
    store: Store
    state: ServerState
    host: str
    port: int
    operator_port: int = -1     # TLS: the token port for operators; -1 = none
    health: Optional[StoreHealth] = None   # grpc.health.v1 status and its plaintext port
    retention: Optional[RetentionWorker] = None   # expires raw telemetry (controlplane/retention.py)

    @property
    def address(self) -> str:
        """Where a client on this machine reaches the server."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else \
            f"{host}:{self.port}"

    def stop(self, grace_s: Optional[float] = 1.0) -> None:
        """Ends agent streams, stops serving, marks agents disconnected, closes the DuckDB file."""
        if self.health is not None:
            self.health.close()   # NOT_SERVING first: probes stop routing here
        unobserve_server(self.state)
        self.state.end_all()
        self.server.stop(grace_s).wait()
        self.state.join_readers(timeout_s=5.0)
        self.state.writer.close()
        if self.state.control is not None:
            self.state.control.close()
        if self.state.bindings is not None:
            self.state.bindings.close()
        if self.retention is not None:   # a running pass needs the store until it ends
            self.retention.stop()
        self.store.close()


def _bind_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def start_server(settings: ServerSettings, control: Optional["ControlSettings"] = None,
                 health: Optional[HealthSettings] = None) -> RunningServer:
    """Opens the store and serves on settings.host:settings.port (0 = a free port).

    control: the closed loop's settings (policies, planner, rollout); None resolves them.
    health: grpc.health.v1 probing and its plaintext port; None resolves them."""
    from headroom_sidecar.controlplane.admin import ControlPlane   # admin -> trials -> server: import late
    auth = ServerAuth(settings)   # refuses unsafe settings before anything is opened
    retention = RetentionSettings.resolve()   # refuses bad HEADROOM_CP_RETENTION_* likewise
    health = health or HealthSettings.resolve()   # likewise: bad env fails here
    store = Store(settings.db_path, duckdb_threads=settings.duckdb_threads,
                  dedupe_batches=settings.dedupe_batches, checkpoint_mb=settings.checkpoint_mb)
    writer = IngestWriter(store, max_pending=settings.ingest_queue_batches,
                          group_max_rows=settings.ingest_group_max_rows)
    state = ServerState(store, settings, writer)
    state.control = ControlPlane(store, state, control)
    state.auth = auth
    if auth.mode is AuthMode.TLS:
        state.bindings = AgentBindings(*store.control_cursor())
    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes),
               ("grpc.so_reuseport", 0)]   # a second server on the same port must fail, not share
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                                    thread_name_prefix="headroom-grpc"),
                         options=options)
    server.add_generic_rpc_handlers((HeadroomService(state).handler(),))
    monitor = add_health(server, store, SERVICE_NAME, health)
    try:
        port = _listen(server, auth, settings.port, settings.host, require_client_cert=True)
        operator_port = -1
        if auth.mode is AuthMode.TLS and settings.operator_port >= 0:
            operator_port = _listen(server, auth, settings.operator_port, settings.host,
                                    require_client_cert=False)
        monitor.listen(settings.host)
    except (OSError, ValueError):
        monitor.close()
        writer.close()
        state.control.close()
        if state.bindings is not None:
            state.bindings.close()
        store.close()
        raise
    server.start()
    expiry = RetentionWorker(store, retention).start()   # stopped before the store closes
    observe_server(state, port)   # OTel metrics on the global provider: no-op unless configured
    log.info("control plane on %s:%d (%s)", settings.host, port, auth.mode.value)
    return RunningServer(server=server, store=store, state=state, host=settings.host, port=port,
                         operator_port=operator_port, health=monitor, retention=expiry)


def _listen(server: grpc.Server, auth: ServerAuth, port: int, host: str,
            require_client_cert: bool) -> int:
    """Adds one listening port (TLS in TLS mode); the bound port number, OSError if none."""
    target = f"{_bind_host(host)}:{port}"
    try:
        if auth.mode is AuthMode.TLS:
            bound = server.add_secure_port(target, auth.credentials(require_client_cert))
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError as e:
        bound, reason = 0, str(e)
    else:
        reason = "address in use or not available"
    if not bound:
        raise OSError(f"control plane cannot listen on {target}: {reason}")
    return bound


def serve_forever(settings: ServerSettings,
                  on_listening: Optional[Callable[[RunningServer], None]] = None) -> None:
    """Serves until SIGTERM or SIGINT, then stops cleanly with the DuckDB file closed."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    running = start_server(settings)
    try:
        if on_listening is not None:
            on_listening(running)
        while not stop.wait(0.5):
            pass
    finally:
        running.stop(grace_s=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
