"""Speculation figures of the request running on this thread, for its telemetry record.

The speculative loop (install.py) notes each generate call's SpecStats here; the request
tracker (agent/observe/requests.py) clears them when a request opens and takes them when it
emits the record. Thread-local: concurrent requests on other threads never mix their figures.
A request that made several generate calls gets their sum.
"""
from __future__ import annotations

import threading
from typing import Optional

from headroom_sidecar.agent.executor.speculative.generate import SpecStats

_local = threading.local()


def note(stats: SpecStats) -> None:
    total = getattr(_local, "stats", None)
    if total is None:
        total = _local.stats = SpecStats()
    total.add(stats)


def take() -> Optional[SpecStats]:
    """This thread's figures since the last take (None: no request speculated), cleared."""
    stats = getattr(_local, "stats", None)
    _local.stats = None
    return stats
