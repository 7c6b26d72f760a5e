"""OpenTelemetry metrics of the control plane: ingest counters and queue depth, connected
agents, the plan each agent runs, and Query executions.

API only: instruments on the MeterProvider given (None: the global one, a no-op until the
process configures one, e.g. with an OTLP reader). Nothing is exported unless asked: the
opt-in Prometheus endpoint (controlplane/prometheus.py, HEADROOM_CP_METRICS_PORT) adds its own
provider, on which observe_server(state, port) reports too. Observable values are read from
ServerState (and, for the active plans, one small query on the store) at collection: no cost
on the ingest path. Query executions are recorded by controlplane/query.py on every provider
that observes a server.
"""
from __future__ import annotations

import enum
import logging
import threading
import weakref
from typing import Iterable, Optional

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from headroom_sidecar.controlplane import prometheus
from headroom_sidecar.controlplane.prometheus import MetricsEndpointSettings

log = logging.getLogger("headroom_sidecar.controlplane.metrics")

METER_NAME = "headroom.controlplane"
# Seconds; DuckDB queries from a point lookup (~1 ms) to the 30 s timeout.
QUERY_DURATION_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                            5.0, 10.0, 30.0]
# Per agent, its latest application record that is not `requested`; `applied` = it runs it.
_ACTIVE_PLANS_SQL = """
SELECT agent_id, plan_id FROM (
  SELECT agent_id, plan_id, state,
         row_number() OVER (PARTITION BY agent_id ORDER BY ts_us DESC) AS latest
  FROM applications WHERE state <> 'requested')
WHERE latest = 1 AND state = 'applied' ORDER BY agent_id"""


class IngestCount(enum.Enum):
    """IngestStats fields reported as `headroom.ingest.*` counters."""
    BATCHES = ("batches", "{batch}", "Batches stored (duplicates included)")
    ROWS = ("rows", "{row}", "Rows stored, all tables")
    BYTES = ("bytes", "By", "Encoded bytes of the batches received")
    DUPLICATES = ("duplicates", "{batch}", "Batches already stored, acked without storing")
    ERRORS = ("errors", "{batch}", "Batches refused (malformed, unauthenticated, store error)")


class QueryOutcome(enum.Enum):
    """`headroom.outcome` of a Query execution: OK or a QueryErrorKind's value."""
    OK = "ok"
    INVALID = "invalid"
    FAILED = "failed"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"


def _active_plans(state) -> list[tuple[str, str]]:
    """(agent_id, plan_id) of each agent whose latest plan application is `applied`."""
    try:
        with state.store.reader() as cur:
            return cur.execute(_ACTIVE_PLANS_SQL).fetchall()
    except Exception as e:   # store closed or broken, table not there yet: report nothing
        log.debug("active plans not readable: %s", e)
        return []


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
        meter.create_observable_up_down_counter(
            "headroom.ingest.queue_depth", unit="{batch}",
            description="Batches waiting for the ingest writer", callbacks=[self._observe_queue])
        meter.create_observable_gauge(
            "headroom.plan.active", unit="{plan}", callbacks=[self._observe_plans],
            description="1 per (agent, plan) the agent runs, by its latest application record")
        self._query_s = meter.create_histogram(
            "headroom.query.duration", unit="s", description="Query executions, by outcome",
            explicit_bucket_boundaries_advisory=QUERY_DURATION_BUCKETS_S)
        self._query_rows = meter.create_counter(
            "headroom.query.rows", unit="{row}", description="Rows returned by Query")

    def _snapshot(self) -> list:
        with self._lock:
            return list(self._states)

    def observing(self) -> bool:
        with self._lock:
            return bool(self._states)

    def _reader(self, field: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for state, port in self._snapshot():
                yield Observation(getattr(state.stats, field), {"server.port": port})
        return observe

    def _observe_agents(self, options: CallbackOptions) -> Iterable[Observation]:
        for state, port in self._snapshot():
            yield Observation(len(state.connected_agents()), {"server.port": port})

    def _observe_queue(self, options: CallbackOptions) -> Iterable[Observation]:
        for state, port in self._snapshot():
            yield Observation(state.writer.pending_batches(), {"server.port": port})

    def _observe_plans(self, options: CallbackOptions) -> Iterable[Observation]:
        for state, port in self._snapshot():
            for agent_id, plan_id in _active_plans(state):
                yield Observation(1, {"server.port": port, "headroom.agent_id": agent_id,
                                      "headroom.plan_id": plan_id})

    def record_query(self, outcome: QueryOutcome, duration_s: float, rows: int) -> None:
        self._query_s.record(duration_s, {"headroom.outcome": outcome.value})
        if rows:
            self._query_rows.add(rows)

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
_ON_ENDPOINT: dict[int, object] = {}   # id(ServerState) -> the endpoint's provider it is on


def _metrics_for(meter_provider) -> _ServerMetrics:
    key = _GLOBAL if meter_provider is None else meter_provider
    with _LOCK:
        return _BY_PROVIDER.get(key) or _BY_PROVIDER.setdefault(key, _ServerMetrics(meter_provider))


def _observe_on_endpoint(state, port: int, endpoint: Optional[MetricsEndpointSettings]) -> None:
    """Also on the Prometheus endpoint, when settings turn it on. Called after the gRPC server
    started, so a bad setting or a taken port is logged, not raised: the server keeps serving."""
    try:
        settings = endpoint or MetricsEndpointSettings.resolve()
        if not settings.enabled:
            return
        provider = prometheus.acquire(settings).meter_provider
    except (ValueError, OSError, ImportError) as e:
        log.error("control plane on port %d serves no /metrics: %s", port, e)
        return
    _metrics_for(provider).add(state, port)
    with _LOCK:
        _ON_ENDPOINT[id(state)] = provider


def observe_server(state, port: int, meter_provider=None,
                   endpoint: Optional[MetricsEndpointSettings] = None) -> None:
    """Reports `state` (a ServerState) on `meter_provider` until unobserve_server. With the
    global provider (None), also on the /metrics endpoint if `endpoint` (None: resolved from
    HEADROOM_CP_METRICS_*) turns it on."""
    _metrics_for(meter_provider).add(state, port)
    if meter_provider is None:
        _observe_on_endpoint(state, port, endpoint)


def unobserve_server(state, meter_provider=None) -> None:
    m = _BY_PROVIDER.get(_GLOBAL if meter_provider is None else meter_provider)
    if m is not None:
        m.remove(state)
    if meter_provider is None:
        with _LOCK:
            provider = _ON_ENDPOINT.pop(id(state), None)
        if provider is not None:
            _metrics_for(provider).remove(state)
            prometheus.release()


def record_query(outcome: QueryOutcome, duration_s: float, rows: int) -> None:
    """One Query execution, on every provider that observes a server (none: nothing)."""
    with _LOCK:
        observers = [m for m in _BY_PROVIDER.values() if m.observing()]
    for m in observers:
        m.record_query(outcome, duration_s, rows)
