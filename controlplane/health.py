"""grpc.health.v1 and server reflection for the control plane.

Health is SERVING while the DuckDB store answers `SELECT 1`, NOT_SERVING once it does not (a
closed or broken store): a probe thread runs it every `probe_interval_s` and on start.

Auth: Health and reflection are not behind ServerAuth (controlplane/auth.py authenticates inside
the Headroom handlers only). They reveal nothing: a status enum and the public proto schema. On
the main port in TLS mode the transport still asks for a client certificate, which Kubernetes
gRPC probes cannot present (they speak plaintext), so `port` opens a second, plaintext port
that serves only grpc.health.v1 - no Headroom service and no reflection on it.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headroom_sidecar.controlplane.aiohost import bind_host
from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.controlplane.store import Store

log = logging.getLogger("headroom_sidecar.controlplane.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class HealthSettings:
    # Seconds between two `SELECT 1` probes of the store (Kubernetes probes every 10 s).
    probe_interval_s: float = field(default=5.0,
                                    metadata={"env": "HEADROOM_CP_HEALTH_INTERVAL_S"})
    # Plaintext port serving only grpc.health.v1, for probes without TLS (-1 = none, 0 = free).
    port: int = field(default=-1, metadata={"env": "HEADROOM_CP_HEALTH_PORT"})

    def __post_init__(self):
        problems = []
        if not self.probe_interval_s > 0:
            problems.append(f"probe_interval_s={self.probe_interval_s} must be > 0")
        if not -1 <= self.port <= 65535:
            problems.append(f"port={self.port} is not -1 (none) or in [0, 65535]")
        if problems:
            raise ValueError("invalid HealthSettings: " + "; ".join(problems))

    @classmethod
    def resolve(cls, **overrides: Any) -> "HealthSettings":
        """Arguments (not None) win, then HEADROOM_CP_HEALTH_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "health")


def store_ok(store: Store) -> bool:
    """True if the store answers a trivial query; False (logged) if it is closed or broken."""
    try:
        with store.reader() as cur:
            return cur.execute("SELECT 1").fetchone() == (1,)
    except Exception as e:   # StoreError, duckdb.Error: either way the store cannot serve
        log.warning("health probe: store %s failed: %s", store.db_path, e)
        return False


class StoreHealth:
    """The health servicer, and the thread that keeps its status in step with the store."""

    def __init__(self, store: Store, settings: HealthSettings, services: tuple[str, ...]):
        self.store = store
        self.settings = settings
        self.services = ("",) + services   # "" = the server as a whole
        self.servicer = health.HealthServicer()
        self.port = -1   # the plaintext health port, once listening
        self._stop = threading.Event()
        self._health_server: Optional[grpc.Server] = None
        self.probe()
        self._thread = threading.Thread(target=self._run, daemon=True, name="headroom-health")
        self._thread.start()

    def probe(self) -> bool:
        ok = store_ok(self.store)
        for service in self.services:
            self.servicer.set(service, SERVING if ok else NOT_SERVING)
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self.settings.probe_interval_s):
            self.probe()

    def listen(self, host: str) -> int:
        """Opens the plaintext health-only port if settings.port >= 0; the bound port or -1."""
        if self.settings.port < 0:
            return -1
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2,
                                                        thread_name_prefix="headroom-health"))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        target = f"{bind_host(host)}:{self.settings.port}"
        self.port = server.add_insecure_port(target)
        if not self.port:
            raise OSError(f"health port cannot listen on {target}: address in use or not available")
        server.start()
        self._health_server = server
        return self.port

    def close(self) -> None:
        """NOT_SERVING for every watcher, then the probe thread and the health port stop."""
        self._stop.set()
        self.servicer.enter_graceful_shutdown()
        self._thread.join(timeout=self.settings.probe_interval_s + 1.0)
        if self._health_server is not None:
            self._health_server.stop(0.5).wait()


def add_health(server: grpc.Server, store: Store, service_name: str,
               settings: Optional[HealthSettings] = None) -> StoreHealth:
    """Registers grpc.health.v1 and reflection (for `service_name` and both) on `server`."""
    monitor = StoreHealth(store, settings or HealthSettings.resolve(), (service_name,))
    health_pb2_grpc.add_HealthServicer_to_server(monitor.servicer, server)
    names = (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return monitor


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """One plaintext Health/Check: the status name (SERVING, NOT_SERVING, ...).
    grpc.RpcError if the server cannot be reached or does not know `service`."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
