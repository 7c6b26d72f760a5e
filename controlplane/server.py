"""The `Headroom` gRPC service: agents stream telemetry in, clients query the store read-only.

It runs on grpc.aio (controlplane/aiohost.py): a Connect stream is read and written on the
event loop, so an idle agent holds no thread. Each message is handled on one of
`stream_workers` threads (parsing, hello checks, handing registrations and batches to the ingest
writer, which may block while the writer is full), one message of a stream at a time, in order;
after a hello the stream waits on the loop, holding no worker, until its registration is
stored. The control plane pushes plans and trial requests to a connected agent at any time,
from any thread, through `ServerState.send_to_agent` (controlplane/stream.py). Query and the
Admin methods are synchronous handlers the aio server runs in its `max_workers` migration pool
(the operator port's server runs them in its own: controlplane/opserver.py). Requests arrive as
raw bytes and are parsed here, so a malformed message gets an ErrorReply instead of tearing the
stream down.

This module builds no control plane: controlplane/app.py wires store, writer, this service,
admin, loop, rollout, trials and retention, and hands the Admin methods in. It imports none of
them (controlplane/inbound.py is what they subscribe through).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import AsyncIterator, Mapping, Optional

import grpc
from google.protobuf.message import DecodeError

from headroom_sidecar.controlplane.auth import (QUERY_ROLE, AgentBindings, AuthError, Principal,
                               PrincipalKind, ServerAuth, require_role)
from headroom_sidecar.controlplane.inbound import InboundCallback, InboundKind  # noqa: F401 (re-exported)
from headroom_sidecar.controlplane.ingest import DecodedBatch, ErrorCode, IngestError, IngestWriter, decode_batch
from headroom_sidecar.controlplane.query import QueryError, QueryErrorKind, encode_result, run_query
from headroom_sidecar.controlplane.schema import COUNTER_COLUMNS, MODEL_COLUMNS
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.controlplane.store import BatchJob, Counters, Registration, Store, StoreError
from headroom_sidecar.controlplane.stream import Session
from headroom_sidecar.proto import headroom_pb2 as pb

log = logging.getLogger("headroom_sidecar.controlplane.server")
# A closing stream waits this long for its hello's registration to be stored before it marks
# the agent disconnected (else the later registration would mark it connected again).
_REGISTRATION_WAIT_S = 30.0

SERVICE_NAME = "headroom.v1.Headroom"


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
        self._sessions: dict[str, Session] = {}   # agent id -> its stream (after hello)
        self._open: set[Session] = set()           # every open stream, hello or not
        self._callbacks: dict[InboundKind, list[InboundCallback]] = {k: [] for k in InboundKind}
        self.control = None   # what the wiring (controlplane/app.py) built on this server
        self.auth: Optional[ServerAuth] = None        # set by the wiring
        self.bindings: Optional[AgentBindings] = None  # TLS: agent id -> certificate
        # Open Connect streams per authenticated agent certificate (in all: len(self._open)).
        self._streams_by_client: dict[str, int] = {}
        self._operator_calls = threading.BoundedSemaphore(settings.max_operator_calls)

    # ------------------------------------------------------------------ public API
    def send_to_agent(self, agent_id: str, message: pb.ControlMessage) -> bool:
        """Queues `message` for the agent's stream; False if it is not connected, or if
        outbound_queue_max messages already wait for an agent that does not read them."""
        with self._lock:
            session = self._sessions.get(agent_id)
        if session is None or session.queued() >= self.settings.outbound_queue_max:
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
        """Calls `callback(agent_id, message)` for every message of `kind`, on a stream worker."""
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

    def _attach(self, session: Session) -> bool:
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
    def open_agent_stream(self, session: Session) -> Optional[str]:
        """Counts a new Connect stream; why not if a limit is reached (then nothing is counted)."""
        principal = session.principal
        key = principal.client_key if principal.kind is PrincipalKind.AGENT else None
        with self._lock:
            if len(self._open) >= self.settings.max_agent_streams:
                return (f"{len(self._open)} agent streams are open, the most "
                        f"max_agent_streams={self.settings.max_agent_streams} allows")
            if key is not None and self._streams_by_client.get(key, 0) >= \
                    self.settings.max_streams_per_client:
                return (f"agent {principal.subject!r} has {self._streams_by_client[key]} streams "
                        f"open, the most max_streams_per_client="
                        f"{self.settings.max_streams_per_client} allows")
            self._open.add(session)
            if key is not None:
                self._streams_by_client[key] = self._streams_by_client.get(key, 0) + 1
        return None

    def close_agent_stream(self, session: Session) -> None:
        principal = session.principal
        key = principal.client_key if principal.kind is PrincipalKind.AGENT else None
        with self._lock:
            self._open.discard(session)
            if key is not None:
                left = self._streams_by_client.pop(key) - 1
                if left:
                    self._streams_by_client[key] = left

    def agent_streams(self) -> int:
        with self._lock:
            return len(self._open)

    def operator_call(self) -> bool:
        """Takes one of the max_operator_calls slots; False if all are busy."""
        return self._operator_calls.acquire(blocking=False)

    def operator_call_done(self) -> None:
        self._operator_calls.release()

    def _detach(self, session: Session) -> None:
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
        """Every stream ends once what is queued for it has been sent (server stop)."""
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            session.finish()

    def detach_all(self) -> None:
        """After the server stopped: agents still attached are marked disconnected."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.ended.set()
            try:
                self._detach(session)
            except StoreError as e:
                log.warning("could not mark agent %s disconnected: %s", session.agent_id, e)


async def _stored_or_late(session: Session) -> None:
    """Waits, on the loop, for the stream's registration to be stored (at most
    _REGISTRATION_WAIT_S): marking the agent disconnected before would be undone by it."""
    if session.registration is not None and not session.registration.done():
        await asyncio.wait([asyncio.wrap_future(session.registration)],
                           timeout=_REGISTRATION_WAIT_S)


def _settle(future: Future, outcome) -> None:
    """A writer outcome (StoredBatch or the exception) onto a future."""
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(None)


def _answered(session: Session, done):
    """The writer's callback: `done`, then the stream's pending count drops (wait_idle)."""
    def answered(outcome) -> None:
        try:
            done(outcome)
        finally:
            session.job_done()
    return answered


def _foreign(msg: pb.AgentMessage, session: Session) -> bool:
    """The message names an agent other than its stream's."""
    return bool(msg.agent_id) and msg.agent_id != session.agent_id


def _verified(session: Session, agent_id: str) -> bool:
    p = session.principal
    return p is not None and (p.kind is PrincipalKind.LOCAL or
                              (p.kind is PrincipalKind.AGENT and p.subject == agent_id))


def _same_principal(a: Session, b: Session) -> bool:
    pa, pb_ = a.principal, b.principal
    if pa is None or pb_ is None or pa.kind is PrincipalKind.LOCAL:
        return pa == pb_   # local trust: the machine's user may reconnect under any id
    return pa.kind == pb_.kind and pa.subject == pb_.subject and pa.cert_sha256 == pb_.cert_sha256


# ---------------------------------------------------------------------- the service
class HeadroomService:
    def __init__(self, state: ServerState, stream_pool: Executor):
        self.state = state
        self.store = state.store
        self.settings = state.settings
        self._stream_pool = stream_pool

    def handler(self, operator_methods: Mapping[str, grpc.RpcMethodHandler]
                ) -> grpc.GenericRpcHandler:
        """Connect and Query, plus the operator methods the wiring hands in (the typed Admin
        RPCs: controlplane/admin.py's registration table, merged by controlplane/app.py, so
        that this module never imports admin). Sync handlers run in the migration pool."""
        # No request deserializer: the raw bytes come to us, so garbage gets a precise answer.
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.connect, response_serializer=pb.ControlMessage.SerializeToString),
            **self.operator_methods(operator_methods),
        })

    def operator_handler(self, operator_methods: Mapping[str, grpc.RpcMethodHandler]
                         ) -> grpc.GenericRpcHandler:
        """Query and the operator methods without Connect: the operator port's service."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                    self.operator_methods(operator_methods))

    def operator_methods(self, operator_methods: Mapping[str, grpc.RpcMethodHandler]
                         ) -> dict[str, grpc.RpcMethodHandler]:
        return {"Query": grpc.unary_unary_rpc_method_handler(
                    self.query, response_serializer=pb.QueryReply.SerializeToString),
                **operator_methods}

    # ------------------------------------------------------------------ Connect (event loop)
    async def connect(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        principal = await self._stream_principal(context)
        loop = asyncio.get_running_loop()
        session = Session(loop, principal)
        refused = self.state.open_agent_stream(session)
        if refused is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        timer = loop.call_later(self.settings.hello_timeout_s, session.expire_hello)
        reader = asyncio.ensure_future(self._read(requests, session))
        try:
            async for msg in session.drain():
                yield msg
        finally:   # also when the client vanishes: grpc cancels this handler
            timer.cancel()
            session.ended.set()
            self.state.close_agent_stream(session)
            if not reader.done():
                reader.cancel()
        if session.hello_expired:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within "
                                f"hello_timeout_s={self.settings.hello_timeout_s:g} s; the "
                                "stream is closed")

    async def _stream_principal(self, context: grpc.aio.ServicerContext) -> Principal:
        try:
            principal = self.state.auth.authenticate(context)
        except AuthError as e:
            await context.abort(e.code, e.message)
        if principal.kind is PrincipalKind.OPERATOR:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"operator "
                                f"{principal.subject!r} cannot open an agent stream; agents "
                                "present an agent certificate")
        return principal

    async def _read(self, requests: AsyncIterator[bytes], session: Session) -> None:
        """Reads the stream on the loop and handles each message on a stream worker, in order.
        When the agent half-closes (or a message ends the stream), the answers to its last
        batches are sent before the stream ends."""
        loop = asyncio.get_running_loop()
        try:
            async for raw in requests:
                if not await self._dispatch_message(loop, raw, session):
                    break
            await session.wait_idle()
        except Exception as e:
            if not isinstance(e, grpc.RpcError):
                log.exception("agent stream %s failed", session.agent_id)
                session.put(_error(ErrorCode.INTERNAL, "internal error; see the server log"))
        finally:   # also when cancelled (the client vanished): the agent is marked disconnected
            await _stored_or_late(session)
            closed = self._stream_pool.submit(self._close_session, session)
        await asyncio.shield(asyncio.wrap_future(closed))
        session.finish()

    async def _registered(self, loop: asyncio.AbstractEventLoop, session: Session) -> bool:
        """After a hello: waits, on the loop and holding no worker, until the writer stored the
        registration; then the subscribers hear of it. False (the stream ends) if it failed."""
        if session.unannounced is None:
            return True
        hello, session.unannounced = session.unannounced, None
        try:
            await asyncio.shield(asyncio.wrap_future(session.registration))
        except Exception as e:
            log.error("agent %s: registration not stored: %s", session.agent_id, e)
            self.state._count(errors=1)
            session.put(_error(ErrorCode.STORE_FAILED, f"registration not stored: {e}"))
            return False
        log.info("agent %s connected (%s pid %d)", session.agent_id, hello.hostname, hello.pid)
        await loop.run_in_executor(self._stream_pool, self.state._dispatch, InboundKind.HELLO,
                                   session.agent_id, hello)
        return True

    def _close_session(self, session: Session) -> None:
        try:
            if session.agent_id is not None:
                self.state._detach(session)
        except StoreError as e:
            log.warning("could not mark agent %s disconnected: %s", session.agent_id, e)

    async def _dispatch_message(self, loop: asyncio.AbstractEventLoop, raw: bytes,
                                session: Session) -> bool:
        """One message, in stream order; False ends the stream. A small batch or heartbeat of
        a registered stream is parsed and validated here on the loop (cheaper than
        the two thread hand-offs a worker costs on a busy 2-core host) and queued for the
        writer without blocking; anything else, or a full writer queue, goes to a stream worker
        (with the message already parsed, if it was)."""
        msg = self._parse_inline(raw, session)
        kind = msg.WhichOneof("body") if msg is not None else None
        if kind not in ("batch", "heartbeat") or _foreign(msg, session):
            handled = await loop.run_in_executor(self._stream_pool, self._handle, raw, session, msg)
            return handled and await self._registered(loop, session)
        prepared = (self._batch_job(msg, session) if kind == "batch"
                    else self._heartbeat_job(msg, session))
        if prepared is not None and not self._submit(session, *prepared, block=False):
            await loop.run_in_executor(self._stream_pool, self._submit, session, *prepared)
        return True

    def _parse_inline(self, raw: bytes, session: Session) -> Optional[pb.AgentMessage]:
        """The message, if it is small and its stream registered; None leaves it to a stream
        worker (large, before hello, or unparsable: its error is made there)."""
        if len(raw) > self.settings.inline_max_bytes or session.agent_id is None \
                or not session.alive():
            return None
        try:
            return pb.AgentMessage.FromString(raw)
        except DecodeError:
            return None

    # ------------------------------------------------------------------ messages (stream worker)
    def _handle(self, raw: bytes, session: Session, msg: Optional[pb.AgentMessage] = None) -> bool:
        """Handles one message (`raw`, unless the loop parsed it already: `msg`) on a stream
        worker; False ends the stream."""
        if not session.alive():
            return False
        if msg is None:
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
        if _foreign(msg, session):
            session.put(_error(ErrorCode.AGENT_ID_MISMATCH,
                               f"message for agent {msg.agent_id!r} on the stream of "
                               f"{session.agent_id!r}; ignored"))
            return True
        handler = self._by_kind.get(kind, HeadroomService._empty)
        handler(self, msg, session)
        return True

    def _no_hello(self, kind: Optional[str], session: Session) -> bool:
        session.put(_error(ErrorCode.HELLO_REQUIRED,
                           f"the first message of a stream must be hello, got {kind or 'nothing'}"))
        return False

    def _hello(self, msg: pb.AgentMessage, session: Session) -> bool:
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
            elif not session.alive():   # the stream ended while hello was handled
                self.state._detach(session)
                return False
        if refused is not None:
            log.warning("hello refused: %s", refused)
            session.put(_error(ErrorCode.AGENT_ID_MISMATCH, refused))
            self.state._count(errors=1)
            return False
        return self._register(msg.hello, session)

    def _register(self, hello: pb.AgentHello, session: Session) -> bool:
        """Queues the registration for the writer, grouped with other agents' writes (a fleet
        reconnecting at once costs a few transactions, not one lock wait each); the stream
        reads on once it is stored (`_registered`). False if the stream ended meanwhile."""
        registration: Future = Future()
        job = BatchJob(session.agent_id, session.pid,
                       registration=registration_from_hello(session.agent_id, hello))
        if not self.state.writer.submit(job, lambda outcome: _settle(registration, outcome),
                                        alive=session.alive):
            return False   # the stream ended; closing it detaches the agent
        session.registration, session.unannounced = registration, hello
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
            return f"{refused}; an admin can release it with the Admin RPC UnbindAgent"
        return None

    def _batch(self, msg: pb.AgentMessage, session: Session) -> None:
        prepared = self._batch_job(msg, session)
        if prepared is not None:
            self._submit(session, *prepared)

    def _batch_job(self, msg: pb.AgentMessage, session: Session) -> Optional[tuple]:
        """The validated batch's (job, done callback); None if it was refused (and answered)."""
        batch = msg.batch
        try:
            decoded = decode_batch(batch, self.store.model_shape(session.agent_id))
        except IngestError as e:
            self.state._count(errors=1)
            session.put(e.reply())
            return None
        job = BatchJob(session.agent_id, session.pid, decoded,
                       counters_from_proto(batch.counters, batch.HasField("counters")))
        return job, lambda outcome: self._stored(session, decoded, outcome)

    def _submit(self, session: Session, job: BatchJob, done, block: bool = True) -> bool:
        """Queues the job for the writer: blocking while it is full (a stream worker only), or
        with block=False only if it has room now (the event loop). False if not queued."""
        session.job_started()
        answered = _answered(session, done)
        queued = (self.state.writer.submit(job, answered, alive=session.alive) if block
                  else self.state.writer.try_submit(job, answered))
        if not queued:
            session.job_done()
        return queued

    def _stored(self, session: Session, decoded: DecodedBatch, outcome) -> None:
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

    def _heartbeat(self, msg: pb.AgentMessage, session: Session) -> None:
        self._submit(session, *self._heartbeat_job(msg, session))

    @staticmethod
    def _heartbeat_job(msg: pb.AgentMessage, session: Session) -> tuple:
        hb = msg.heartbeat
        # Through the writer, so counters are stored in the order the agent sent them;
        # without counters it still refreshes last_seen.
        job = BatchJob(session.agent_id, session.pid,
                       counters=counters_from_proto(hb.counters, hb.HasField("counters")))
        return job, lambda outcome: None

    def _plan_status(self, msg: pb.AgentMessage, session: Session) -> None:
        self.state._dispatch(InboundKind.PLAN_STATUS, session.agent_id, msg.plan_status)

    def _trial_result(self, msg: pb.AgentMessage, session: Session) -> None:
        self.state._dispatch(InboundKind.TRIAL_RESULT, session.agent_id, msg.trial_result)

    def _duplicate_hello(self, msg: pb.AgentMessage, session: Session) -> None:
        session.put(_error(ErrorCode.DUPLICATE_HELLO,
                           f"agent {session.agent_id!r} already said hello on this stream"))

    def _empty(self, msg: pb.AgentMessage, session: Session) -> None:
        session.put(_error(ErrorCode.EMPTY_MESSAGE, "AgentMessage without a body"))

    _by_kind = {"batch": _batch, "heartbeat": _heartbeat, "plan_status": _plan_status,
                "trial_result": _trial_result, "hello": _duplicate_hello}

    # ------------------------------------------------------------------ Query (migration pool)
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
            n = self.settings.max_operator_calls
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{n} Query/Admin calls are "
                          f"running, the most max_operator_calls={n} allows; retry shortly")
        return principal

    def _authenticate(self, context: grpc.ServicerContext) -> Principal:
        """For sync handlers (their context aborts by raising)."""
        try:
            return self.state.auth.authenticate(context)
        except AuthError as e:
            context.abort(e.code, e.message)

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


_STATUS_BY_KIND = {QueryErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
                   QueryErrorKind.FAILED: grpc.StatusCode.INVALID_ARGUMENT,
                   QueryErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
                   QueryErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED}
