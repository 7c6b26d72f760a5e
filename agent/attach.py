"""`attach(model)`: adapters, observation, export, the executor and its control handler, and
(without an address) an embedded control plane."""
from __future__ import annotations

import os
import threading
from typing import Optional

from torch import nn

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.control import ControlHandler
from headroom_sidecar.agent.embedded import EmbeddedControlPlane, start_embedded
from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.agent.exporter import make_exporter
from headroom_sidecar.agent.fingerprint import model_info
from headroom_sidecar.agent.gpu import gpu_status, start_gpu_sampler
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.settings import AgentSettings


class _SharedEmbedded:
    """One embedded control plane per DuckDB file per process (DuckDB allows one writer
    process), shared by every handle that needs it and stopped when the last one detaches."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, tuple[EmbeddedControlPlane, int]] = {}

    def acquire(self, db_path: str) -> EmbeddedControlPlane:
        key = os.path.abspath(db_path)
        with self._lock:
            cp, users = self._running.get(key, (None, 0))
            if cp is None or not cp.alive():
                cp, users = start_embedded(key), 0
            self._running[key] = (cp, users + 1)
            return cp

    def release(self, cp: EmbeddedControlPlane) -> None:
        with self._lock:
            for key, (running, users) in list(self._running.items()):
                if running is cp:
                    if users > 1:
                        self._running[key] = (running, users - 1)
                    else:
                        del self._running[key]
                        cp.stop()


_EMBEDDED = _SharedEmbedded()


def _active_plan(executor: Executor) -> Optional[tuple[str, str]]:
    """(plan_id, sha256) of the plan the model runs now, for the hello of every (re)connect."""
    plan = executor.active_plan
    return None if plan is None else (plan.plan_id, plan.hash)


def class_plan_refs(control: ControlHandler) -> list[tuple[str, str, str]]:
    """(query class, plan_id, sha256) of each class plan the model runs beside the default."""
    return [(c, p.plan_id, p.hash) for c, p in control.classes.plans().items()]


def attach(model: nn.Module, *, tokenizer=None, address: Optional[str] = None,
           settings: Optional[AgentSettings] = None, tracer_provider=None,
           meter_provider=None, **overrides) -> AgentHandle:
    """Starts observing `model`; returns a handle whose detach() undoes everything.

    tokenizer: turns text eval sets of trials into token ids (optional: token-id eval sets
    need none). address: "host:port" of a running control plane; None starts an embedded one
    on localhost (DuckDB file: settings.embedded_db_path). Other keyword arguments are
    AgentSettings fields. Plans and trials pushed by the control plane run between requests.
    A model dispatched by accelerate with weights offloaded to the host or disk (parameters on
    the meta device) is fingerprinted from the offload hooks' weights_map and observed as usual;
    a plan that must move offloaded weights fails with TransformError, the model restored.
    Meta parameters that no offload hook holds raise fingerprint.OffloadError here.
    tracer_provider / meter_provider: OpenTelemetry providers for the request spans and the
    metrics (None: the global ones, no-ops unless the user configured them).
    """
    if settings is None:
        settings = AgentSettings.resolve(address=address, **overrides)
    elif address is not None or overrides:
        raise TypeError("pass either settings or individual setting arguments, not both")
    structure = resolve_structure(model)
    info = model_info(model, structure)       # before any plan: names the unoptimised model
    executor = Executor(model, structure, info.fingerprint)
    control = ControlHandler(model, structure, executor, settings, tokenizer=tokenizer)
    embedded = None
    target = settings.address
    if settings.export_enabled and target is None:
        embedded = _EMBEDDED.acquire(settings.embedded_db_path)
        target = embedded.address
        control.verifier.trust(embedded.plan_public_key, "embedded control plane")
    status = gpu_status()
    hello = wire.make_hello(wire.default_agent_id(settings), info, status, settings)
    exporter = make_exporter(settings, hello, target, on_control=control.handle,
                             active_plan=lambda: _active_plan(executor),
                             class_plans=lambda: class_plan_refs(control))
    sampler = start_gpu_sampler(exporter.submit_gpu, settings.gpu_sample_interval_ms)

    def on_detach() -> None:
        sampler.stop()
        exporter.shutdown(settings.shutdown_timeout_ms)
        if embedded is not None:
            _EMBEDDED.release(embedded)

    return AgentHandle(model, structure, settings, sink=exporter.submit, on_detach=on_detach,
                       tracer_provider=tracer_provider, meter_provider=meter_provider,
                       executor=executor, control=control,
                       exporter=exporter, model_info=info, agent_id=hello.agent_id,
                       gpu_status=status, target=target)
