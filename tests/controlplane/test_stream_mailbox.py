"""controlplane/stream.py: messages put from many threads reach each stream's queue in order,
with one loop wake-up per burst rather than one per message."""
import asyncio
import threading

from headroom_sidecar.controlplane.auth import Principal, PrincipalKind
from headroom_sidecar.controlplane.stream import Session
from headroom_sidecar.proto import headroom_pb2 as pb

SENDERS, PER_SENDER = 4, 500


class CountingLoop(asyncio.SelectorEventLoop):
    """A real loop that counts cross-thread wake-ups."""
    wakeups = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def _principal() -> Principal:
    return Principal(kind=PrincipalKind.LOCAL, subject="local")


async def _collect(sessions: list) -> dict:
    got = {}
    for session in sessions:
        got[session] = [msg.ack.seq async for msg in session.drain()]
    return got


def _send(sessions: list, start: threading.Event) -> None:
    start.wait()
    for seq in range(PER_SENDER):
        for session in sessions:
            session.put(pb.ControlMessage(ack=pb.Ack(seq=seq)))


def test_puts_from_threads_arrive_in_order_with_few_wakeups():
    loop = CountingLoop()
    try:
        sessions = [Session(loop, _principal()) for _ in range(SENDERS)]
        start = threading.Event()
        # One sender thread per session: each session's messages come from one thread, in order.
        threads = [threading.Thread(target=_send, args=([s], start)) for s in sessions]
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join()
        for s in sessions:
            s.finish()
        got = loop.run_until_complete(_collect(sessions))
    finally:
        loop.close()
    for s in sessions:
        assert got[s] == list(range(PER_SENDER))
        assert s.queued() == 0
    # A wake-up per message would be SENDERS * PER_SENDER (+ the ENDs); bursts share one.
    assert loop.wakeups < SENDERS * PER_SENDER // 2


def test_put_after_the_loop_closed_says_false():
    loop = asyncio.new_event_loop()
    session = Session(loop, _principal())
    loop.close()
    assert session.put(pb.ControlMessage(ack=pb.Ack(seq=1))) is False
