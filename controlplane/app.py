"""The control plane's wiring, in one place: store, ingest writer, the gRPC service on its
event loop, health, the Admin methods with the closed loop behind them (admin -> loop ->
rollout -> trials), retention and metrics.

Dependencies point one way: this module imports them all; server.py imports none of admin,
loop, rollout, trials; those reach the server only through the state handed to them here
(controlplane/inbound.AgentLink) and never import server.py.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from headroom_sidecar.controlplane.admin import ControlPlane, ControlSettings, method_handlers
from headroom_sidecar.controlplane.aiohost import AioHost, bind_host
from headroom_sidecar.controlplane.auth import AgentBindings, AuthMode, ServerAuth
from headroom_sidecar.controlplane.health import HealthSettings, StoreHealth, add_health
from headroom_sidecar.controlplane.ingest import IngestWriter
from headroom_sidecar.controlplane.metrics import observe_server, unobserve_server
from headroom_sidecar.controlplane.opserver import OperatorServer
from headroom_sidecar.controlplane.retention import RetentionSettings, RetentionWorker
from headroom_sidecar.controlplane.server import SERVICE_NAME, HeadroomService, ServerState
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.controlplane.store import Store

log = logging.getLogger("headroom_sidecar.controlplane.app")


@dataclass
class RunningServer:
    host_loop: AioHost
    store: Store
    state: ServerState
    host: str
    port: int
    operators: Optional[OperatorServer] = None   # the operator port's server (opserver.py)
    health: Optional[StoreHealth] = None   # grpc.health.v1 status and its plaintext port
    retention: Optional[RetentionWorker] = None   # expires raw telemetry (controlplane/retention.py)
    _stopped: bool = field(default=False, repr=False)

    @property
    def operator_port(self) -> int:
        """Query/Admin apart from agent traffic (with TLS: token, no certificate); -1 = none."""
        return self.operators.port if self.operators is not None else -1

    @property
    def address(self) -> str:
        """Where a client on this machine reaches the server."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"{bind_host(host)}:{self.port}"

    def stop(self, grace_s: Optional[float] = 1.0) -> None:
        """Ends agent streams, stops serving, marks agents disconnected, closes the DuckDB file."""
        if self._stopped:
            return
        self._stopped = True
        if self.health is not None:
            self.health.close()   # NOT_SERVING first: probes stop routing here
        unobserve_server(self.state)
        self.state.end_all()
        if self.operators is not None:
            self.operators.stop(grace_s)
        self.host_loop.stop(grace_s)
        self.state.writer.close()
        self.state.detach_all()
        _close_parts(self.state, self.retention)
        self.store.close()


def _close_parts(state: ServerState, retention: Optional[RetentionWorker]) -> None:
    if state.control is not None:
        state.control.close()
    if state.bindings is not None:
        state.bindings.close()
    if retention is not None:   # a running pass needs the store until it ends
        retention.stop()


def _grpc_options(settings: ServerSettings) -> list[tuple]:
    return [("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0)]   # a second server on the same port must fail, not share


def _build_state(settings: ServerSettings, auth: ServerAuth,
                 control: Optional[ControlSettings]) -> ServerState:
    """Store, writer, server state and the control plane (admin, loop, rollout, trials) on it."""
    store = Store(settings.db_path, duckdb_threads=settings.duckdb_threads,
                  dedupe_batches=settings.dedupe_batches, checkpoint_mb=settings.checkpoint_mb)
    writer = IngestWriter(store, max_pending=settings.ingest_queue_batches,
                          group_max_rows=settings.ingest_group_max_rows)
    state = ServerState(store, settings, writer)
    state.auth = auth
    try:
        state.control = ControlPlane(store, state, control)
        if auth.mode is AuthMode.TLS:
            state.bindings = AgentBindings(*store.control_cursor())
    except Exception:
        writer.close()
        _close_parts(state, None)
        store.close()
        raise
    return state


def _operator_server(settings: ServerSettings, service: HeadroomService,
                     methods: dict) -> Optional[OperatorServer]:
    if settings.operator_port < 0:
        return None
    return OperatorServer(service.operator_handler(methods), settings.max_workers,
                          _grpc_options(settings))


def _listen_all(host: AioHost, operators: Optional[OperatorServer], auth: ServerAuth,
                settings: ServerSettings, monitor: StoreHealth) -> int:
    """The agent port, the operator port if asked for, then the plaintext health port if asked
    for; the agent port. All bound before any serves: a port in use fails the start."""
    port = host.listen(auth, settings.port, settings.host, require_client_cert=True)
    if operators is not None:
        operators.listen(auth, settings.operator_port, settings.host)
    monitor.listen(settings.host)
    host.start()
    if operators is not None:
        operators.start()
    return port


def start_server(settings: ServerSettings, control: Optional[ControlSettings] = None,
                 health: Optional[HealthSettings] = None) -> RunningServer:
    """Opens the store and serves on settings.host:settings.port (0 = a free port).

    control: the closed loop's settings (policies, planner, rollout); None resolves them.
    health: grpc.health.v1 probing and its plaintext port; None resolves them."""
    auth = ServerAuth(settings)   # refuses unsafe settings before anything is opened
    retention = RetentionSettings.resolve()   # refuses bad HEADROOM_CP_RETENTION_* likewise
    health = health or HealthSettings.resolve()   # likewise: bad env fails here
    state = _build_state(settings, auth, control)
    host = AioHost(settings.max_workers, settings.stream_workers, _grpc_options(settings))
    service = HeadroomService(state, host.stream_pool)
    methods = method_handlers(service)   # the typed Admin RPCs (admin.py)
    host.on_loop(lambda: host.server.add_generic_rpc_handlers((service.handler(methods),)))
    monitor = host.on_loop(lambda: add_health(host.server, state.store, SERVICE_NAME, health))
    operators = _operator_server(settings, service, methods)
    try:
        port = _listen_all(host, operators, auth, settings, monitor)
    except (OSError, ValueError):
        monitor.close()
        if operators is not None:
            operators.stop(0)
        host.stop(0)
        state.writer.close()
        _close_parts(state, None)
        state.store.close()
        raise
    expiry = RetentionWorker(state.store, retention).start()   # stopped before the store closes
    observe_server(state, port)   # OTel metrics on the global provider: no-op unless configured
    log.info("control plane on %s:%d (%s)", settings.host, port, auth.mode.value)
    return RunningServer(host_loop=host, store=state.store, state=state, host=settings.host,
                         port=port, operators=operators, health=monitor, retention=expiry)


def serve_forever(settings: ServerSettings,
                  on_listening: Optional[Callable[[RunningServer], None]] = None) -> None:
    """Serves until SIGTERM or SIGINT, then stops cleanly with the DuckDB file closed."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    running = start_server(settings)
    try:
        if on_listening is not None:
            on_listening(running)
        while not stop.wait(0.5):
            pass
    finally:
        running.stop(grace_s=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
