"""An opt-in Prometheus `/metrics` endpoint over an OpenTelemetry MeterProvider of its own,
shared by the agent (`agent.observe.metrics.start_prometheus`) and the control plane
(`controlplane/prometheus.py`, HEADROOM_CP_METRICS_PORT).

The reader feeds a registry of its own, not prometheus_client's global one, so nothing global
changes and two endpoints in one process never mix their metrics.
"""
from __future__ import annotations


class PrometheusEndpoint:
    """A MeterProvider whose PrometheusMetricReader is served over HTTP on host:port.

    what: how errors name this endpoint and the settings that chose host and port.
    install_hint: what to install when the exporter is missing."""

    def __init__(self, port: int, host: str, what: str, install_hint: str):
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as e:
            raise ImportError(f"{install_hint} ({e})") from None
        registry = CollectorRegistry(auto_describe=True)
        self.meter_provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=registry)])
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            self.meter_provider.shutdown()
            raise OSError(f"{what} cannot listen on {host}:{port}: {e}") from None
        self.host = host
        self.port: int = self._http.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stops serving and shuts the provider down (detach what uses it first)."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5.0)
        self.meter_provider.shutdown()

    def __enter__(self) -> "PrometheusEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
