"""Model work posted by a control thread for a serving thread to run (RequestTracker.run_model_work).

Why: on a CPU, torch work on a second Python thread runs its own OpenMP team, which fights the
serving thread's team, so a trial measured on the control thread measures the contention, not
the plan (SmolLM2: 55.5 ms/token on a helper thread against 33.9 on the serving thread). Work
is claimed exactly once: by a serving thread, or taken back by the poster after its handoff
time.
"""
from __future__ import annotations

import collections
import enum
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class WorkSite(str, enum.Enum):
    SERVING_THREAD = "serving_thread"
    CONTROL_THREAD = "control_thread"


@dataclass(eq=False)
class Work(Generic[T]):
    fn: Callable[[], T]
    claimed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None
    site: Optional[WorkSite] = None
    thread_ident: int = 0

    def outcome(self) -> tuple[T, WorkSite]:
        """(result, site), or fn's exception raised on the caller's thread."""
        if self.error is not None:
            raise self.error
        return self.result, self.site


class WorkQueue:
    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._items: collections.deque[Work] = collections.deque()

    @property
    def pending(self) -> bool:
        """Lock-free hint for the request-open path: a deque's truth is one C call."""
        return bool(self._items)

    def post(self, fn: Callable[[], T]) -> Work[T]:
        work = Work(fn)
        with self._cv:
            self._items.append(work)
            self._cv.notify_all()
        return work

    def claim(self) -> Optional[Work]:
        """The oldest posted work, now this thread's to run; None if nothing is posted."""
        with self._cv:
            if not self._items:
                return None
            work = self._items.popleft()
        work.claimed.set()
        return work

    def withdraw(self, work: Work) -> bool:
        """The poster takes its work back to run it itself; False if a serving thread has it."""
        with self._cv:
            try:
                self._items.remove(work)
            except ValueError:
                return False
        work.claimed.set()
        return True

    def wait(self, timeout_s: float) -> bool:
        """Waits up to timeout_s (monotonic) for posted work; True if some is posted."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self._items:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return False
                self._cv.wait(left_s)
            return True


def check_seconds(name: str, value: float) -> float:
    """A finite, non-negative number of seconds, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds >= 0")
    return float(value)
