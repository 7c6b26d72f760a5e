"""Ships records from the model's process to the control plane, like OpenTelemetry's
BatchSpanProcessor: a bounded queue on the hot path, one worker thread that batches, encodes
and sends over the `Connect` stream, reconnecting with backoff.

Delivery is exactly once while the control plane keeps its store (and de-duplicates batches, as
it does by default). A batch written to a stream
that breaks before its Ack stays kept (bounded: RESEND_MAX_BATCHES / RESEND_MAX_BYTES, the oldest
dropped and counted in failed_batches / lost_records past that) and is resent after the
reconnect, in seq order, with its original seq: the server stores a batch once per
(agent_id, pid, seq), so a batch it stored before the break is acked again and not stored twice.
A batch the server answers with ErrorReply was refused: counted lost, not resent.

The queues, the unacked window and the counters are agent/batching.py's; control commands
that arrive on the stream run on agent/dispatch.py's thread. This module is the transport.
"""
from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import time
from typing import Any, Callable, Optional, Protocol

import grpc

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.batching import ExportBuffer
from headroom_sidecar.agent.credentials import AgentChannels
from headroom_sidecar.agent.dispatch import ControlDispatcher, OnControl
from headroom_sidecar.agent.records import GpuSample, RequestRecord
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc

log = logging.getLogger("headroom.exporter")

__all__ = ["ACK_TIMEOUT_S", "BatchExporter", "Exporter", "NoopExporter", "OnControl",
           "make_exporter"]

MAX_INFLIGHT_BATCHES = 4      # unacked batches on a stream; more waits, the queue absorbs it
ACK_TIMEOUT_S = 30.0          # oldest unacked batch older than this: the stream is dead
CONNECT_TIMEOUT_S = 5.0       # a black-holed address fails after this
POLL_S = 0.05                 # how often blocking waits look at the stop flag
RESEND_MAX_BATCHES = 64       # unacked batches kept across a reconnect for resending ...
RESEND_MAX_BYTES = 16 << 20   # ... and their encoded size; past either the oldest are lost

# (plan_id, sha256) of the plan the model runs now, or None: goes in every hello.
ActivePlan = Callable[[], Optional[tuple[str, str]]]              # -> (plan_id, sha256)
ClassPlansNow = Callable[[], list[tuple[str, str, str]]]          # -> [(class, plan_id, sha256)]


class Exporter(Protocol):
    def submit(self, record: RequestRecord) -> None: ...
    def submit_gpu(self, sample: GpuSample) -> None: ...
    def send_reply(self, reply: wire.Reply) -> None: ...
    def counters(self) -> wire.ExportCounters: ...
    def flush(self, timeout_ms: Optional[int] = None) -> bool: ...
    def shutdown(self, timeout_ms: Optional[int] = None) -> bool: ...


class NoopExporter:
    """Export disabled: same interface, does nothing, so the hot path never checks a flag."""

    def submit(self, record: RequestRecord) -> None:
        pass

    def submit_gpu(self, sample: GpuSample) -> None:
        pass

    def send_reply(self, reply: wire.Reply) -> None:
        pass

    def counters(self) -> wire.ExportCounters:
        return wire.ExportCounters()

    def flush(self, timeout_ms: Optional[int] = None) -> bool:
        return True

    def shutdown(self, timeout_ms: Optional[int] = None) -> bool:
        return True


def _called(fn: Optional[Callable[[], Any]], default: Any, name: str) -> Any:
    """fn() for the hello, or `default`: a faulty callback must not keep the agent from
    connecting."""
    if fn is None:
        return default
    try:
        return fn()
    except Exception:
        log.exception("headroom exporter: %s callback failed", name)
        return default


def make_exporter(settings: AgentSettings, hello: pb.AgentHello, target: Optional[str],
                  on_control: Optional[OnControl] = None,
                  active_plan: Optional[ActivePlan] = None,
                  class_plans: Optional[ClassPlansNow] = None) -> "BatchExporter | NoopExporter":
    if not settings.export_enabled:
        return NoopExporter()
    if not target:
        raise ValueError("make_exporter: export is enabled but no control plane address was given "
                         "(settings.address is None and no embedded control plane was started)")
    return BatchExporter(settings, hello, target, on_control=on_control, active_plan=active_plan,
                         class_plans=class_plans)


# ------------------------------------------------------------------ one Connect stream
class _Stream:
    """One `Connect` call: an outbox feeding gRPC's request iterator and a reader thread."""

    def __init__(self, channel: grpc.Channel, hello: pb.AgentHello,
                 on_reply: Callable[[pb.ControlMessage], None], on_dead: Callable[[], None]):
        self._channel = channel
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._on_reply, self._on_dead = on_reply, on_dead
        self.dead = threading.Event()
        self.error = ""
        self.opened_at = time.monotonic()
        self.acked_any = False
        self._outbox.put(wire.hello_message(hello))
        self._call = headroom_pb2_grpc.HeadroomStub(channel).Connect(self._requests())
        self._reader = threading.Thread(target=self._read, name="headroom-export-reader",
                                        daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            msg = self._outbox.get()
            if msg is None:       # half-close: the server finishes and ends its replies
                return
            yield msg

    def send(self, msg: pb.AgentMessage) -> None:
        self._outbox.put(msg)

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._on_reply(reply)
            self.error = "the control plane ended the stream"
        except grpc.RpcError as e:
            self.error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # a bug in reply handling must not kill the exporter silently
            log.exception("headroom exporter: reply handling failed")
            self.error = repr(e)
        finally:
            self._outbox.put(None)   # releases gRPC's request thread if it is still waiting
            self.dead.set()
            self._on_dead()

    def abort(self, reason: str) -> None:
        if not self.dead.is_set():
            self.error = reason
        self._call.cancel()

    def close(self, grace_s: float) -> None:
        """Half-closes, lets the server send its last acks for up to grace_s, then cancels."""
        self._outbox.put(None)
        self._reader.join(max(0.0, grace_s))
        self._call.cancel()
        self._reader.join(1.0)
        _close_later(self._channel)


def _open_channel(target: str, stop: threading.Event, timeout_s: float,
                  channels: AgentChannels) -> Optional[grpc.Channel]:
    """A fresh channel once READY; None on refusal, timeout or stop (no gRPC internal backoff)."""
    channel = channels.open(target)
    states: queue.SimpleQueue = queue.SimpleQueue()
    channel.subscribe(states.put, try_to_connect=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                state = states.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if state == grpc.ChannelConnectivity.READY:
                return channel
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                         grpc.ChannelConnectivity.SHUTDOWN):
                break
    finally:
        channel.unsubscribe(states.put)
    _close_later(channel)
    return None


_closing_channels: queue.SimpleQueue = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer: Optional[threading.Thread] = None


def _close_channels() -> None:
    while True:
        _closing_channels.get().close()


def _close_later(channel: grpc.Channel) -> None:
    """Closes a channel on a shared daemon thread: channel.close() (and the channel's __del__)
    can wait ~0.2 s for gRPC's connectivity poller, which must not hold up the worker's stop."""
    global _closer
    with _closer_lock:
        if _closer is None:
            _closer = threading.Thread(target=_close_channels, name="headroom-channel-closer",
                                       daemon=True)
            _closer.start()
    _closing_channels.put(channel)


# ------------------------------------------------------------------ the exporter
class BatchExporter:
    """See the module docstring. submit() and submit_gpu() are O(1), never block on I/O, never raise."""

    def __init__(self, settings: AgentSettings, hello: pb.AgentHello, target: str,
                 on_control: Optional[OnControl] = None, ack_timeout_s: float = ACK_TIMEOUT_S,
                 active_plan: Optional[ActivePlan] = None,
                 class_plans: Optional[ClassPlansNow] = None,
                 resend_max_batches: int = RESEND_MAX_BATCHES,
                 resend_max_bytes: int = RESEND_MAX_BYTES):
        if not hello.agent_id:
            raise ValueError("BatchExporter: hello.agent_id is empty (see wire.default_agent_id)")
        if resend_max_batches < 0 or resend_max_bytes < 0:
            raise ValueError(f"BatchExporter: resend_max_batches={resend_max_batches} and "
                             f"resend_max_bytes={resend_max_bytes} must be >= 0")
        self._active_plan, self._class_plans = active_plan, class_plans
        self._settings, self._hello, self._target = settings, hello, target
        self._channels = AgentChannels(settings)   # reads TLS files now: bad paths fail at attach
        self._ack_timeout_s = ack_timeout_s
        self._agent_id = hello.agent_id
        self._buffer = ExportBuffer(settings.queue_max_records, settings.batch_max_records,
                                    resend_max_batches, resend_max_bytes)
        # The control plane drops a batch whose (agent_id, pid, seq) it already stored, so seq
        # must never repeat in this process, even for a re-attach under the same agent_id.
        self._seq = time.time_ns() // 1000
        self._wake, self._closing, self._stop = threading.Event(), threading.Event(), threading.Event()
        self._flush_requested = threading.Event()
        self._stream: Optional[_Stream] = None
        self._in_outage = False
        self._dispatcher = ControlDispatcher(on_control)
        self._worker = threading.Thread(target=self._run, name="headroom-export", daemon=True)
        self._worker.start()
        atexit.register(self._at_exit)

    # -------------------------------------------------------------- hot path
    def submit(self, record: RequestRecord) -> None:
        if self._buffer.add_record(record):
            self._wake.set()

    def submit_gpu(self, sample: GpuSample) -> None:
        self._buffer.add_gpu(sample)

    def send_reply(self, reply: wire.Reply) -> None:
        """Queues a PlanStatusReport / TrialResultReport for the stream (at most once, like batches)."""
        self._buffer.add_reply(reply)
        self._wake.set()

    # -------------------------------------------------------------- introspection and control
    def counters(self) -> wire.ExportCounters:
        return self._buffer.counters()

    @property
    def target(self) -> str:
        return self._target

    def _pending(self) -> bool:
        return self._buffer.pending()

    def flush(self, timeout_ms: Optional[int] = None) -> bool:
        """Sends everything queued now and waits for its acks; False if the deadline came first."""
        timeout_ms = self._settings.shutdown_timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        self._flush_requested.set()
        self._wake.set()
        while self._pending():
            if time.monotonic() >= deadline or not self._worker.is_alive():
                return False
            time.sleep(0.005)
        return True

    def shutdown(self, timeout_ms: Optional[int] = None) -> bool:
        """Tries to deliver what is queued, then stops; returns by the deadline. True if all sent."""
        timeout_ms = self._settings.shutdown_timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        atexit.unregister(self._at_exit)
        self._closing.set()
        self._wake.set()
        self._worker.join(max(0.0, deadline - time.monotonic() - 2 * POLL_S))
        if self._worker.is_alive():
            self._stop.set()
            self._wake.set()
            stream = self._stream
            if stream is not None:
                stream.abort("shutdown deadline")
            self._worker.join(max(0.0, deadline - time.monotonic()))
        self._dispatcher.close()
        return not self._worker.is_alive() and not self._pending()

    def _at_exit(self) -> None:
        self.shutdown()

    # -------------------------------------------------------------- replies from the server
    def _on_reply(self, msg: pb.ControlMessage) -> None:
        kind = msg.WhichOneof("body")
        if kind == "ack":   # refused rows first: whoever sees the ack sees them counted
            self._on_rows_rejected(msg.ack)
            self._on_ack(msg.ack.seq, msg.ack.rows_stored)
        elif kind == "error":
            self._on_error(msg.error.code, msg.error.message)
        else:
            command = wire.command_from_pb(msg)
            if command is not None:
                self._dispatcher.put(command)

    def _on_ack(self, seq: int, rows_stored: int) -> None:
        self._buffer.ack(seq, rows_stored)
        stream = self._stream
        if stream is not None:
            stream.acked_any = True
        self._wake.set()

    def _on_rows_rejected(self, ack: pb.Ack) -> None:
        """Rows the control plane refused inside an acked batch (the rest was stored)."""
        if ack.rows_rejected:
            log.warning("headroom control plane refused %d row(s) of batch %d: %s",
                        ack.rows_rejected, ack.seq, ack.reject_reason)
            self._buffer.count("server_rejected_rows", ack.rows_rejected)

    def _on_error(self, code: str, message: str) -> None:
        """The server refused the oldest unacked batch (it answers each batch once, in order)."""
        log.warning("headroom control plane error %s: %s", code, message)
        self._buffer.fail_oldest()
        self._wake.set()

    # -------------------------------------------------------------- worker: connection loop
    def _run(self) -> None:
        backoff_ms = self._settings.backoff_initial_ms
        connections = 0
        while not self._stop.is_set() and not (self._closing.is_set() and not self._pending()):
            stream = self._connect()
            if stream is None:
                self._count_connect_failure()
                self._sleep_backoff(backoff_ms)
                backoff_ms = min(2 * backoff_ms, self._settings.backoff_max_ms)
                continue
            connections += 1
            if connections > 1:
                self._buffer.count("reconnects")
            self._pump(stream)
            self._end_stream(stream)
            if self._stream_was_healthy(stream):
                backoff_ms = self._settings.backoff_initial_ms
            elif not self._stop.is_set() and not self._closing.is_set():
                self._sleep_backoff(backoff_ms)
                backoff_ms = min(2 * backoff_ms, self._settings.backoff_max_ms)

    def _connect(self) -> Optional[_Stream]:
        channel = _open_channel(self._target, self._stop, CONNECT_TIMEOUT_S, self._channels)
        if channel is None:
            return None
        stream = _Stream(channel, self._current_hello(), self._on_reply, self._wake.set)
        self._stream = stream
        self._in_outage = False
        self._buffer.set_connected(True)
        log.info("headroom exporter: connected to %s", self._target)
        return stream

    def _current_hello(self) -> pb.AgentHello:
        """The hello with the plan the model runs now: a restarted control plane settles a
        rollout it was killed in from what each agent says here."""
        hello = pb.AgentHello()
        hello.CopyFrom(self._hello)
        active = _called(self._active_plan, None, "active_plan")
        if active is not None:
            hello.active_plan_id, hello.active_plan_hash = active
        for query_class, plan_id, plan_hash in _called(self._class_plans, [], "class_plans"):
            hello.class_plans.add(query_class=query_class, plan_id=plan_id, plan_hash=plan_hash)
        return hello

    def _stream_was_healthy(self, stream: _Stream) -> bool:
        lived_s = time.monotonic() - stream.opened_at
        return stream.acked_any or lived_s * 1000 >= self._settings.backoff_max_ms

    def _sleep_backoff(self, backoff_ms: int) -> None:
        # Jitter in [backoff/2, backoff]: a fleet of agents does not reconnect in lockstep.
        delay_s = backoff_ms / 1000 * random.uniform(0.5, 1.0)
        deadline = time.monotonic() + delay_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self._closing.is_set() and not self._pending():
                return
            self._stop.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _end_stream(self, stream: _Stream) -> None:
        """Closes the stream (gracefully if it is alive); unacked batches stay for a resend."""
        grace_s = 0.0 if self._stop.is_set() or stream.dead.is_set() else 1.0
        stream.close(grace_s)
        self._buffer.set_connected(False)
        self._buffer.trim_unacked()
        self._stream = None
        if stream.error and not self._closing.is_set():
            log.warning("headroom exporter: stream to %s lost (%s); reconnecting",
                        self._target, stream.error)

    def _count_connect_failure(self) -> None:
        self._buffer.count("connect_failures")
        # One line per outage, not one per attempt: a dead control plane must not flood the log.
        if not self._in_outage:
            self._in_outage = True
            log.warning("headroom exporter: cannot reach the control plane at %s; records queue "
                        "(bounded, oldest dropped) until it is back", self._target)

    # -------------------------------------------------------------- worker: resending
    def _resend_unacked(self, stream: _Stream) -> None:
        """First thing on a new stream: the batches the last one left unacked, oldest first,
        with their original seq (the hello carries the same pid), so the server's
        (agent_id, pid, seq) de-duplication stores each exactly once. Their counters are
        stale by now: left out, so they never overwrite newer ones in the agents table."""
        kept = self._buffer.take_for_resend()   # their ack timeouts count from this send
        for sent in kept:
            batch = pb.TelemetryBatch()
            batch.CopyFrom(sent)
            batch.ClearField("counters")
            stream.send(wire.batch_message(self._agent_id, batch))
        if kept:
            log.info("headroom exporter: resent %d unacked batch(es)", len(kept))

    # -------------------------------------------------------------- worker: one stream
    def _pump(self, stream: _Stream) -> None:
        """Sends batches, replies and heartbeats until the stream dies, stop, or closing is done."""
        self._resend_unacked(stream)
        last_send = time.monotonic()
        last_batch = last_send
        interval_s = self._settings.flush_interval_ms / 1000
        while not stream.dead.is_set() and not self._stop.is_set():
            self._wake.clear()
            if self._closing.is_set() and not self._pending():
                return
            if self._ack_overdue():
                stream.abort(f"no ack for {self._ack_timeout_s:g} s")
                return
            now = time.monotonic()
            if self._send_replies(stream):
                last_send = now
            if self._window_open() and self._batch_due(now - last_batch >= interval_s):
                if self._send_batch(stream):
                    last_send = last_batch = now
                continue
            if now - last_send >= interval_s:
                stream.send(wire.heartbeat_message(self._agent_id, self.counters()))
                self._buffer.count("heartbeats")
                last_send = now
            self._wake.wait(self._idle_wait_s(now, last_send, last_batch, interval_s))

    def _idle_wait_s(self, now: float, last_send: float, last_batch: float,
                     interval_s: float) -> float:
        """Until the next heartbeat, or the batch timer if records are waiting and can go.

        With the in-flight window full, only an ack (which sets _wake) lets a batch go: no spin.
        Never past the oldest unacked batch's ack deadline: a stalled stream is dropped (and its
        batches resent) after ack_timeout_s, however long the flush interval."""
        can_send = self._buffer.can_send(MAX_INFLIGHT_BATCHES)
        oldest_sent_at = self._buffer.oldest_sent_at()
        due = last_batch + interval_s if can_send else last_send + interval_s
        if oldest_sent_at is not None:
            due = min(due, oldest_sent_at + self._ack_timeout_s + POLL_S)
        return min(interval_s, max(0.001, due - now))

    def _window_open(self) -> bool:
        return self._buffer.window_len() < MAX_INFLIGHT_BATCHES

    def _ack_overdue(self) -> bool:
        oldest_sent_at = self._buffer.oldest_sent_at()
        return oldest_sent_at is not None and time.monotonic() - oldest_sent_at > self._ack_timeout_s

    def _batch_due(self, timer_fired: bool) -> bool:
        n, gpu = self._buffer.queued()
        if n == 0 and gpu == 0:
            self._flush_requested.clear()
            return False
        urgent = self._flush_requested.is_set() or self._closing.is_set()
        return urgent or timer_fired or n >= self._settings.batch_max_records

    def _send_replies(self, stream: _Stream) -> bool:
        replies = self._buffer.pop_replies()
        for reply in replies:
            stream.send(wire.reply_message(self._agent_id, reply))
        return bool(replies)

    def _send_batch(self, stream: _Stream) -> bool:
        records, gpu = self._buffer.take()
        batch, records, gpu = self._encode(records, gpu)
        if not self._buffer.sent(batch, len(records)):
            return False
        stream.send(wire.batch_message(self._agent_id, batch))
        return True

    # -------------------------------------------------------------- worker: encoding
    def _encode(self, records: list, gpu: list):
        """(batch, records, gpu) with malformed items removed and counted; batch None if empty."""
        try:
            return self._build(records, gpu), records, gpu
        except Exception:
            records = [r for r in records if self._encodable([r], [])]
            gpu = [g for g in gpu if self._encodable([], [g])]
        if not records and not gpu:
            return None, records, gpu
        return self._build(records, gpu), records, gpu

    def _encodable(self, records: list, gpu: list) -> bool:
        try:
            wire.batch_to_pb(0, records, gpu, wire.ExportCounters())
            return True
        except Exception as e:
            log.warning("headroom exporter: dropped a malformed %s: %s",
                        "record" if records else "GPU sample", e)
            self._buffer.count("rejected_records" if records else "gpu_dropped")
            return False

    def _build(self, records: list, gpu: list) -> pb.TelemetryBatch:
        self._seq += 1
        return wire.batch_to_pb(self._seq, records, gpu, self.counters())
