"""The exporter's buffers and counters: bounded queues of records, GPU samples and replies on
the hot path, the window of batches sent and not yet acked (kept for a resend), and the
ExportCounters over all of it. Everything here sits behind one lock that is held only for
deque and counter updates, never for I/O; agent/exporter.py does the sending.

Bounds: a full record queue drops its oldest record (fresh data is worth more), counted in
dropped_records; past the resend bound (count or bytes) the oldest unacked batches are lost,
counted in failed_batches / lost_records.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Optional

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.records import GpuSample, RequestRecord
from headroom_sidecar.proto import headroom_pb2 as pb

GPU_QUEUE_MAX = 4096          # GPU samples arrive ~1/s per device; this is over an hour
REPLY_QUEUE_MAX = 1024        # plan statuses and trial results waiting for a stream

# ExportCounters fields this module counts; queue_len and connected are read off the state.
_COUNTED = tuple(f for f in wire.ExportCounters.__dataclass_fields__
                 if f not in ("queue_len", "connected"))


@dataclass
class Inflight:
    """A batch sent and not yet acked; kept whole so a reconnect can resend it unchanged."""
    records: int
    sent_at: float                # time.monotonic() of the last send
    batch: Optional[pb.TelemetryBatch] = None
    size_bytes: int = 0


class ExportBuffer:
    """See the module docstring. Every public method takes `lock` itself; `inflight` (seq ->
    Inflight, oldest first) may be read or changed directly only while holding `lock`."""

    def __init__(self, queue_max_records: int, batch_max_records: int,
                 resend_max_batches: int, resend_max_bytes: int):
        self.lock = threading.Lock()
        self._queue_max, self._batch_max = queue_max_records, batch_max_records
        self._resend_max_batches, self._resend_max_bytes = resend_max_batches, resend_max_bytes
        self._records: collections.deque = collections.deque()
        self._gpu: collections.deque = collections.deque()
        self._replies: collections.deque = collections.deque(maxlen=REPLY_QUEUE_MAX)
        self._counts = {name: 0 for name in _COUNTED}
        self._connected = False
        self.inflight: "collections.OrderedDict[int, Inflight]" = collections.OrderedDict()
        self._building = 0            # records popped but not yet in a sent batch

    # -------------------------------------------------------------- hot path
    def add_record(self, record: RequestRecord) -> bool:
        """Queues a record; True when a full batch first became available (wake the sender
        then, not on every submit above it: a sender waiting for acks would spin)."""
        with self.lock:
            if len(self._records) >= self._queue_max:
                self._records.popleft()
                self._counts["dropped_records"] += 1
            self._records.append(record)
            self._counts["enqueued_records"] += 1
            return len(self._records) == self._batch_max

    def add_gpu(self, sample: GpuSample) -> None:
        with self.lock:
            if len(self._gpu) >= GPU_QUEUE_MAX:
                self._gpu.popleft()
                self._counts["gpu_dropped"] += 1
            self._gpu.append(sample)
            self._counts["gpu_enqueued"] += 1

    def add_reply(self, reply: wire.Reply) -> None:
        self._replies.append(reply)   # deque append/popleft are atomic: no lock needed

    def pop_replies(self) -> list[wire.Reply]:
        out = []
        while self._replies:
            out.append(self._replies.popleft())
        return out

    # -------------------------------------------------------------- counters
    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self._counts[name] += n

    def set_connected(self, connected: bool) -> None:
        with self.lock:
            self._connected = connected

    def counters(self) -> wire.ExportCounters:
        with self.lock:
            return wire.ExportCounters(**self._counts, queue_len=len(self._records),
                                       connected=self._connected)

    def pending(self) -> bool:
        """Anything queued, being built, or unacked."""
        with self.lock:
            return bool(self._records or self._gpu or self._replies or self.inflight
                        or self._building)

    # -------------------------------------------------------------- batching
    def queued(self) -> tuple[int, int]:
        """(records, GPU samples) waiting."""
        with self.lock:
            return len(self._records), len(self._gpu)

    def take(self) -> tuple[list, list]:
        """Up to one batch of records and every GPU sample, marked as being built."""
        with self.lock:
            n = min(len(self._records), self._batch_max)
            records = [self._records.popleft() for _ in range(n)]
            gpu = list(self._gpu)
            self._gpu.clear()
            self._building = n + len(gpu)
        return records, gpu

    def sent(self, batch: Optional[pb.TelemetryBatch], records: int) -> bool:
        """The taken items are built: `batch` (None: nothing encodable) goes into the window."""
        with self.lock:
            self._building = 0
            if batch is None:
                return False
            self._counts["sent_batches"] += 1
            self._counts["sent_records"] += records
            self.inflight[batch.seq] = Inflight(records, time.monotonic(), batch, batch.ByteSize())
            return True

    # -------------------------------------------------------------- the unacked window
    def window_len(self) -> int:
        with self.lock:
            return len(self.inflight)

    def can_send(self, max_inflight: int) -> bool:
        """Records or samples are waiting and the window has room for a batch."""
        with self.lock:
            return bool(self._records or self._gpu) and len(self.inflight) < max_inflight

    def oldest_sent_at(self) -> Optional[float]:
        with self.lock:
            oldest = next(iter(self.inflight.values()), None)
        return None if oldest is None else oldest.sent_at

    def ack(self, seq: int, rows_stored: int) -> None:
        """Acks are cumulative: the server handles a stream's batches in order."""
        with self.lock:
            while self.inflight and next(iter(self.inflight)) <= seq:
                _, done = self.inflight.popitem(last=False)
                self._counts["acked_batches"] += 1
                self._counts["acked_records"] += done.records
            self._counts["acked_rows"] += rows_stored

    def fail_oldest(self) -> None:
        """The server refused the oldest unacked batch: lost, not resent."""
        with self.lock:
            if self.inflight:
                _, failed = self.inflight.popitem(last=False)
                self._counts["failed_batches"] += 1
                self._counts["lost_records"] += failed.records

    def trim_unacked(self) -> None:
        """Past the resend bound (count or bytes) the oldest unacked batches go, counted lost."""
        with self.lock:
            total_bytes = sum(f.size_bytes for f in self.inflight.values())
            while self.inflight and (len(self.inflight) > self._resend_max_batches
                                     or total_bytes > self._resend_max_bytes):
                _, old = self.inflight.popitem(last=False)
                total_bytes -= old.size_bytes
                self._counts["failed_batches"] += 1
                self._counts["lost_records"] += old.records

    def take_for_resend(self) -> list[pb.TelemetryBatch]:
        """The unacked batches, oldest first, their ack timers restarted now."""
        with self.lock:
            kept = list(self.inflight.values())
            now = time.monotonic()
            for f in kept:
                f.sent_at = now
            self._counts["resent_batches"] += len(kept)
            self._counts["resent_records"] += sum(f.records for f in kept)
        return [f.batch for f in kept]
