"""Who may use the model now: a fair readers-writer gate over one model.

Untraced requests hold it shared (they run concurrently); traced requests and control work
(plan apply, rollback, trial, guard check) hold it exclusively. Admission is by ticket, in
arrival order and phase-fair:
  - a shared ticket is admitted once no earlier exclusive ticket is outstanding;
  - an exclusive ticket is admitted once no earlier ticket of any kind is outstanding.
So exclusive work waits for the requests already in to end, requests arriving after it queue
behind it, and the requests that queued behind it get in before any later exclusive work: a
serving loop waits at most one exclusive holder (one trial, apply, check or traced request).
"Outstanding" = waiting or holding. A ticket may be released on any thread (detach does).
One lock round trip per acquire and per release; nothing per forward.
"""
from __future__ import annotations

import enum
import itertools
import threading


class Holder(enum.Enum):
    REQUEST = "request"          # untraced request: shared
    TRACED = "traced"            # traced request: exclusive (per-layer hooks see every thread)
    CONTROL = "control"          # plan apply / rollback / trial / guard check: exclusive

    @property
    def exclusive(self) -> bool:
        return self is not Holder.REQUEST


class ModelGate:
    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._tickets = itertools.count()
        self._outstanding: dict[int, Holder] = {}      # ticket -> holder kind, waiting or holding
        self._waiters = 0
        self._control_waiting = 0

    def acquire(self, holder: Holder) -> tuple[int, frozenset[Holder]]:
        """Blocks until admitted; returns (ticket for release, kinds that made it wait: empty
        when admitted at once)."""
        with self._cv:
            ticket = next(self._tickets)
            self._outstanding[ticket] = holder
            blockers = self._blockers(ticket, holder)
            if not blockers:
                return ticket, frozenset()
            self._waiters += 1
            self._control_waiting += holder is Holder.CONTROL
            try:
                while self._blockers(ticket, holder):
                    self._cv.wait()
            except BaseException:
                del self._outstanding[ticket]
                self._cv.notify_all()
                raise
            finally:
                self._waiters -= 1
                self._control_waiting -= holder is Holder.CONTROL
            return ticket, blockers

    def release(self, ticket: int) -> None:
        with self._cv:
            if self._outstanding.pop(ticket, None) is not None and self._waiters:
                self._cv.notify_all()

    def _blockers(self, ticket: int, holder: Holder) -> frozenset[Holder]:
        """Kinds of the earlier outstanding tickets that keep `ticket` out (caller holds _cv)."""
        return frozenset(h for t, h in self._outstanding.items()
                         if t < ticket and (holder.exclusive or h.exclusive))

    @property
    def control_waiting(self) -> bool:
        return self._control_waiting > 0

    @property
    def waiting(self) -> int:
        """Acquires blocked now (requests and control work)."""
        return self._waiters
