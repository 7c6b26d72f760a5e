"""The control plane's opt-in Prometheus `/metrics` endpoint.

Off by default (port -1). On (HEADROOM_CP_METRICS_PORT=9464, or 0 for a free port), the process
gets one OpenTelemetry MeterProvider whose PrometheusMetricReader feeds a CollectorRegistry of
its own (not prometheus_client's global one: nothing else in the process leaks onto the page),
served over plain HTTP on `host` (127.0.0.1 unless HEADROOM_CP_METRICS_HOST says otherwise).
controlplane/metrics.py observes every server on this provider besides the global one, so the
page carries headroom.ingest.*, headroom.agents.connected, headroom.ingest.queue_depth,
headroom.plan.active and headroom.query.* under Prometheus names (dots -> underscores, unit
suffixes such as `_seconds`, counters `_total`).

One endpoint per process, shared by every server in it and closed with the last one (acquire /
release, reference counted). opentelemetry-sdk and opentelemetry-exporter-prometheus are
imported only when the endpoint is turned on.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.proto.prometheus import PrometheusEndpoint

log = logging.getLogger("headroom_sidecar.controlplane.prometheus")

OFF = -1
_INSTALL_HINT = ("the /metrics endpoint needs opentelemetry-sdk and "
                 "opentelemetry-exporter-prometheus: pip install 'headroom-sidecar[controlplane]'")


@dataclass(frozen=True)
class MetricsEndpointSettings:
    # HTTP port of /metrics: -1 = no endpoint (the default), 0 = a free port.
    port: int = field(default=OFF, metadata={"env": "HEADROOM_CP_METRICS_PORT"})
    # Address it binds; loopback unless the operator opens it (e.g. 0.0.0.0 in a pod).
    host: str = field(default="127.0.0.1", metadata={"env": "HEADROOM_CP_METRICS_HOST"})

    def __post_init__(self):
        problems = []
        if not OFF <= self.port <= 65535:
            problems.append(f"port={self.port} is not -1 (off) or in [0, 65535]")
        if not self.host:
            problems.append("host is empty")
        if problems:
            raise ValueError("invalid MetricsEndpointSettings: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.port != OFF

    @classmethod
    def resolve(cls, **overrides: Any) -> "MetricsEndpointSettings":
        """Arguments (not None) win, then HEADROOM_CP_METRICS_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "metrics endpoint")


def _start(settings: MetricsEndpointSettings) -> PrometheusEndpoint:
    return PrometheusEndpoint(settings.port, settings.host,
                              "metrics endpoint (HEADROOM_CP_METRICS_PORT / HEADROOM_CP_METRICS_HOST)",
                              _INSTALL_HINT)


_LOCK = threading.Lock()
_endpoint: Optional[PrometheusEndpoint] = None
_users = 0


def acquire(settings: MetricsEndpointSettings) -> PrometheusEndpoint:
    """The process's endpoint, started on first use (later settings are not re-read)."""
    global _endpoint, _users
    with _LOCK:
        if _endpoint is None:
            _endpoint = _start(settings)
            log.info("Prometheus metrics on %s", _endpoint.url)
        _users += 1
        return _endpoint


def release() -> None:
    """One user fewer; the last one closes the endpoint."""
    global _endpoint, _users
    with _LOCK:
        if _endpoint is None:
            return
        _users -= 1
        if _users > 0:
            return
        endpoint, _endpoint, _users = _endpoint, None, 0
    endpoint.close()


def running_endpoint() -> Optional[PrometheusEndpoint]:
    """The endpoint this process serves, if any (its port when settings asked for 0)."""
    with _LOCK:
        return _endpoint
