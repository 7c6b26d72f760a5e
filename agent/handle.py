"""What `agent.attach(model)` returns: the observation hooks on one model, and their removal.

    handle = AgentHandle(model, resolve_structure(model), AgentSettings.resolve(), sink=records.append)
    with handle.request(tenant="acme", route="/chat", query_class="qa"):
        model.generate(ids, max_new_tokens=32)
    handle.detach()   # the model is exactly what it was before

Thread-safety: one request at a time per model (the usual single serving loop per model).
Concurrent requests on one model from several threads are merged into whichever is open.
No hook ever raises into the model: a failure is counted in `errors` and the request goes on
untraced.
"""
from __future__ import annotations

from typing import Callable, ContextManager, Optional

from torch import nn

from agent.adapters.base import ModelStructure
from agent.observe.requests import ErrorCount, RequestTracker, Sink
from agent.settings import AgentSettings


class AgentHandle:
    def __init__(self, model: nn.Module, structure: ModelStructure, settings: AgentSettings,
                 sink: Sink, on_detach: Optional[Callable[[], None]] = None, *,
                 tracer_provider=None):
        """tracer_provider: an OpenTelemetry TracerProvider for request spans; None = global."""
        self.model = model
        self.structure = structure
        self.settings = settings
        self._on_detach = on_detach
        self._errors = ErrorCount()
        self._tracker = RequestTracker(model, structure, settings, sink, self._errors,
                                       tracer_provider=tracer_provider)
        self._tracker.attach()
        self._attached = True

    def request(self, tenant: str = "", route: str = "", query_class: str = "") -> ContextManager[None]:
        """Bounds and labels one request; generate/forward calls inside it belong to it."""
        return self._tracker.request(tenant=tenant, route=route, query_class=query_class)

    @property
    def requests_seen(self) -> int:
        """Requests completed and handed to the sink (those with at least one forward)."""
        return self._tracker.requests_seen

    @property
    def errors(self) -> int:
        """Failures inside observation (hooks, sink), each caught and counted."""
        return self._errors.count

    @property
    def attached(self) -> bool:
        return self._attached

    def detach(self) -> None:
        """Removes every hook and the generate wrapper; idempotent."""
        if not self._attached:
            return
        self._attached = False
        self._tracker.detach()
        if self._on_detach is not None:
            self._on_detach()
