"""OpenTelemetry metrics of the control plane: ingest counters and connected agents.

API only: observable instruments on the MeterProvider given (None: the global one, a no-op
until the process configures one, e.g. with an OTLP or Prometheus reader). Nothing is exported
unless asked. Values are read from ServerState at collection: no cost on the ingest path.
"""
from __future__ import annotations

import enum
import threading
import weakref
from typing import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

METER_NAME = "headroom.controlplane"


class IngestCount(enum.Enum):
    """IngestStats fields reported as `headroom.ingest.*` counters."""
    BATCHES = ("batches", "{batch}", "Batches stored (duplicates included)")
    ROWS = ("rows", "{row}", "Rows stored, all tables")
    BYTES = ("bytes", "By", "Encoded bytes of the batches received")
    DUPLICATES = ("duplicates", "{batch}", "Batches already stored, acked without storing")
    ERRORS = ("errors", "{batch}", "Batches refused (malformed, unauthenticated, store error)")


class _ServerMetrics:
    """One set of instruments per meter provider (an SDK meter keeps the first registration's
    callbacks only), reading every observed server state."""

    def __init__(self, meter_provider):
        self._lock = threading.Lock()
        self._states: list = []            # (ServerState, port) of each observed server
        meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
        for count in IngestCount:
            field, unit, description = count.value
            meter.create_observable_counter(f"headroom.ingest.{field}", unit=unit,
                                            description=description,
                                            callbacks=[self._reader(field)])
        meter.create_observable_up_down_counter(
            "headroom.agents.connected", unit="{agent}", description="Agents with an open stream",
            callbacks=[self._observe_agents])

    def _snapshot(self) -> list:
        with self._lock:
            return list(self._states)

    def _reader(self, field: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for state, port in self._snapshot():
                yield Observation(getattr(state.stats, field), {"server.port": port})
        return observe

    def _observe_agents(self, options: CallbackOptions) -> Iterable[Observation]:
        for state, port in self._snapshot():
            yield Observation(len(state.connected_agents()), {"server.port": port})

    def add(self, state, port: int) -> None:
        with self._lock:
            self._states.append((state, port))

    def remove(self, state) -> None:
        with self._lock:
            self._states = [(s, p) for s, p in self._states if s is not state]


class _Global:
    """Key for the global meter provider."""


_GLOBAL = _Global()
# Weak keys: a provider the user dropped takes its instruments' registry with it.
_BY_PROVIDER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def observe_server(state, port: int, meter_provider=None) -> None:
    """Reports `state` (a ServerState) on `meter_provider` until unobserve_server."""
    key = _GLOBAL if meter_provider is None else meter_provider
    with _LOCK:
        m = _BY_PROVIDER.get(key) or _BY_PROVIDER.setdefault(key, _ServerMetrics(meter_provider))
    m.add(state, port)


def unobserve_server(state, meter_provider=None) -> None:
    m = _BY_PROVIDER.get(_GLOBAL if meter_provider is None else meter_provider)
    if m is not None:
        m.remove(state)
