"""One agent's Connect stream on the server's event loop: its outbound queue and its state.

Anything may send to the agent from any thread (the ingest writer's acks, a rollout's plans,
a trial request): `put` hands the message to the loop through the loop's mailbox (one
call_soon_threadsafe per burst of messages, not per message), so every message, whoever sends
it, reaches the asyncio queue in the order it was put. The gRPC handler
drains that queue on the loop; an idle stream holds no thread.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from concurrent.futures import Future
from typing import AsyncIterator, Optional

from headroom_sidecar.controlplane.auth import Principal
from headroom_sidecar.proto import headroom_pb2 as pb

_IDLE_POLL_S = 0.01   # how often a closing stream looks whether its last batches are answered


class _End:
    """Queue markers: the stream ends after what was queued before them."""


END, HELLO_EXPIRED = _End(), _End()


class _Mailbox:
    """Hands (queue, item) pairs from any thread to one event loop with one wake-up per burst:
    the ingest writer answers a group of hundreds of batches at once, and a wake-up per ack
    (a self-pipe write and a loop iteration each) cost more than the acks. Items reach their
    queues in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False   # a _deliver is queued on the loop and has not run yet

    def post(self, queue: asyncio.Queue, item) -> bool:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
            return True
        except RuntimeError:   # the loop is closed: the server stopped
            with self._lock:
                self._scheduled = False
            return False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = \
    weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's one mailbox (one per loop, however many streams it serves)."""
    with _MAILBOXES_LOCK:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = _Mailbox(loop)
        return box


class Session:
    def __init__(self, loop: asyncio.AbstractEventLoop, principal: Principal):
        self.loop = loop
        self.principal = principal
        self.agent_id: Optional[str] = None
        self.pid = 0
        self.hello_expired = False
        # The hello's registration, stored by the writer (concurrent.futures.Future), and the
        # hello until subscribers have been told of it (controlplane/server.py).
        self.registration: Optional[Future] = None
        self.unannounced: Optional[pb.AgentHello] = None
        # Set when the stream ends for any reason: writers and senders stop at once.
        self.ended = threading.Event()
        self._outbound: asyncio.Queue = asyncio.Queue()
        self._mailbox = _mailbox(loop)
        self._lock = threading.Lock()
        self._queued = 0    # messages put and not yet drained
        self._pending = 0   # jobs handed to the writer and not yet answered

    # ------------------------------------------------------------------ any thread
    def alive(self) -> bool:
        return not self.ended.is_set()

    def put(self, msg: pb.ControlMessage) -> bool:
        """Never blocks: acks and errors are bounded by the batches the writer holds."""
        if not self.alive():
            return False
        with self._lock:
            self._queued += 1
        return self._post(msg)

    def queued(self) -> int:
        with self._lock:
            return self._queued

    def job_started(self) -> None:
        with self._lock:
            self._pending += 1

    def job_done(self) -> None:
        with self._lock:
            self._pending -= 1

    def pending(self) -> int:
        with self._lock:
            return self._pending

    def finish(self) -> None:
        """The stream ends once what is queued now has been sent."""
        self._post(END)

    def _post(self, item) -> bool:
        return self._mailbox.post(self._outbound, item)

    # ------------------------------------------------------------------ on the loop
    def expire_hello(self) -> None:
        """The hello deadline passed (a loop timer): a stream without hello is closed."""
        if self.agent_id is None and self.alive():
            self.hello_expired = True
            self._post(HELLO_EXPIRED)

    async def drain(self) -> AsyncIterator[pb.ControlMessage]:
        """What the gRPC handler writes: queued messages until an end marker."""
        while True:
            item = await self._outbound.get()
            if isinstance(item, _End):
                return
            with self._lock:
                self._queued -= 1
            yield item

    async def wait_idle(self) -> None:
        """Until every job of this stream is answered, or the stream ended."""
        while self.pending() and self.alive():
            await asyncio.sleep(_IDLE_POLL_S)
