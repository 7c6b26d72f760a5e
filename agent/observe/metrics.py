"""OpenTelemetry metrics of the agent: GenAI server latency histograms and token usage per
request, and the exporter's record counters.

API only: instruments come from the MeterProvider the user passes to attach() (or the global
one, a no-op proxy until the user sets one). The agent installs no provider, reader or exporter,
so nothing is exported unless the user asked for it. Names, units and bucket boundaries follow
the GenAI semantic conventions (gen-ai-metrics.md); TTFT and TPOT are for successful requests.

Prometheus in one call (opt-in; needs opentelemetry-sdk and opentelemetry-exporter-prometheus):

    endpoint = start_prometheus(9464)            # http://127.0.0.1:9464/metrics
    handle = attach(model, meter_provider=endpoint.meter_provider)
    ...
    endpoint.close()

The page shows e.g. gen_ai_server_time_to_first_token_seconds (histogram: _bucket, _count,
_sum) and headroom_exporter_records_total{headroom_outcome="acked"}.
"""
from __future__ import annotations

import enum
import math
import threading
import weakref
from typing import Iterable, Optional

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from headroom_sidecar.agent.observe.spans import error_type
from headroom_sidecar.agent.records import RequestRecord
from headroom_sidecar.proto.prometheus import PrometheusEndpoint

METER_NAME = "headroom.agent"
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0]
TPOT_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
DURATION_BUCKETS_S = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                      40.96, 81.92]
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]


class TokenType(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"


class RequestMetrics:
    """Per request: TTFT, TPOT, duration and two token-usage points (a few calls, no lock of
    ours: the SDK's instruments are thread-safe)."""

    def __init__(self, meter_provider=None, base: Optional[dict] = None):
        meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
        self._ttft_s = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate the first token, successful requests",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S)
        self._tpot_s = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token after the first, successful requests",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S)
        self._duration_s = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Request duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Input (prompt, padding excluded) and output tokens per request",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._base = dict(base or {})
        self._by_type = {t: {**self._base, "gen_ai.token.type": t.value} for t in TokenType}

    def record(self, rec: RequestRecord, error: Optional[BaseException] = None) -> None:
        if error is not None:
            self._duration_s.record(rec.latency_ms / 1e3,
                                    {**self._base, "error.type": error_type(error)})
            return
        if not math.isnan(rec.latency_ms):
            self._duration_s.record(rec.latency_ms / 1e3, self._base)
        if not math.isnan(rec.ttft_ms):
            self._ttft_s.record(rec.ttft_ms / 1e3, self._base)
        if not math.isnan(rec.tpot_ms):         # nan below two decode steps
            self._tpot_s.record(rec.tpot_ms / 1e3, self._base)
        self._tokens.record(rec.prompt_tokens, self._by_type[TokenType.INPUT])
        self._tokens.record(rec.output_tokens, self._by_type[TokenType.OUTPUT])


class RecordOutcome(enum.Enum):
    """ExportCounters fields reported by `headroom.exporter.records`, as `headroom.outcome`."""
    ENQUEUED = "enqueued_records"
    DROPPED = "dropped_records"
    REJECTED = "rejected_records"
    SENT = "sent_records"
    ACKED = "acked_records"
    LOST = "lost_records"


class _ExporterCounters:
    """One observable counter per meter provider, reading every live exporter's counters()
    at collection (an SDK meter keeps the first registration's callbacks only, so the
    handles of one provider share it)."""

    def __init__(self, meter_provider):
        self._lock = threading.Lock()
        self._exporters: dict[object, str] = {}          # exporter -> agent_id
        meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
        meter.create_observable_counter(
            "headroom.exporter.records", callbacks=[self._observe], unit="{record}",
            description="Request records through the agent's exporter, by outcome")
        meter.create_observable_up_down_counter(
            "headroom.exporter.queue_length", callbacks=[self._observe_queue], unit="{record}",
            description="Records waiting in the exporter's queue")

    def add(self, agent_id: str, exporter) -> None:
        with self._lock:
            self._exporters[exporter] = agent_id

    def remove(self, exporter) -> None:
        with self._lock:
            self._exporters.pop(exporter, None)

    def _snapshot(self) -> list:
        with self._lock:
            exporters = list(self._exporters.items())
        return [(agent_id, e.counters()) for e, agent_id in exporters]

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        for agent_id, c in self._snapshot():
            for outcome in RecordOutcome:
                attrs = {"headroom.agent_id": agent_id, "headroom.outcome": outcome.name.lower()}
                yield Observation(getattr(c, outcome.value), attrs)

    def _observe_queue(self, options: CallbackOptions) -> Iterable[Observation]:
        for agent_id, c in self._snapshot():
            yield Observation(c.queue_len, {"headroom.agent_id": agent_id})


class _Global:
    """Key for the global meter provider."""


_GLOBAL = _Global()
# Weak keys: a provider the user dropped takes its instruments' registry with it.
_COUNTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def observe_exporter(meter_provider, agent_id: str, exporter) -> None:
    """Reports `exporter`'s counters on `meter_provider` (None: global) until unobserve."""
    key = _GLOBAL if meter_provider is None else meter_provider
    with _COUNTERS_LOCK:
        counters = _COUNTERS.get(key)
        if counters is None:
            counters = _COUNTERS[key] = _ExporterCounters(meter_provider)
    counters.add(agent_id, exporter)


def unobserve_exporter(meter_provider, exporter) -> None:
    counters = _COUNTERS.get(_GLOBAL if meter_provider is None else meter_provider)
    if counters is not None:
        counters.remove(exporter)


def start_prometheus(port: int = 9464, host: str = "127.0.0.1") -> PrometheusEndpoint:
    """Serves the metrics of every handle attached with meter_provider=<the result's
    meter_provider> on http://host:port/metrics (port 0: a free one, see .port). Loopback
    unless `host` says otherwise; raises ValueError for a port outside [0, 65535] and OSError
    when it cannot listen. Nothing global is touched: other providers are unaffected."""
    if not 0 <= port <= 65535:
        raise ValueError(f"start_prometheus: port={port} is not in [0, 65535]")
    if not host:
        raise ValueError("start_prometheus: host is empty")
    return PrometheusEndpoint(port, host, "start_prometheus",
                              "start_prometheus needs opentelemetry-sdk and "
                              "opentelemetry-exporter-prometheus: pip install "
                              "'headroom-sidecar[prometheus]'")
