"""What `agent.attach(model)` returns: the observation hooks on one model, its executor and
control handler, and their removal.

    handle = AgentHandle(model, resolve_structure(model), AgentSettings.resolve(), sink=records.append)
    with handle.request(tenant="acme", route="/chat", query_class="qa"):
        model.generate(ids, max_new_tokens=32)
    handle.detach()   # the model is exactly what it was before

Threads: each thread's requests are its own (a FastAPI thread pool calling generate on one
model gives one record per call). Untraced requests run concurrently; a traced (sampled)
request holds the model alone, because its per-layer hooks would count other threads' forwards
(the waits this causes are in stats().traced_serialised_waits).
No hook ever raises into the model: a failure is counted in `errors` and the request goes on
untraced.

Plans and trials (apply_plan, rollback, run_trial, and the same commands from the control
plane) run only between requests: called while requests are open on other threads they wait
for them to end; called from inside a request on its own thread they raise RuntimeError.
Trials run on a serving thread when one comes by (the next request, or an idle loop calling
`handle.serve_pending(timeout_s)`), since on a CPU a second thread's torch work fights the
serving thread's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Mapping, Optional

from torch import nn

from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.agent.control import ControlHandler, ControlStats, EvalSpec, as_plan
from headroom_sidecar.agent.executor import ApplyReport, Executor
from headroom_sidecar.agent.fingerprint import ModelInfo
from headroom_sidecar.agent.guard import GuardStats
from headroom_sidecar.agent.observe.metrics import observe_exporter, unobserve_exporter
from headroom_sidecar.agent.observe.requests import ErrorCount, RequestTracker, Sink, WorkSite
from headroom_sidecar.proto.plan import Plan
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.agent.trial import EvalSet, Evidence
from headroom_sidecar.agent import wire

PlanInput = Plan | Mapping[str, Any] | str | bytes


@dataclass(frozen=True)
class HandleStats:
    requests_seen: int
    errors: int
    boundary_waits: int            # control work that waited for a request to end
    traces_paused_skipped: int     # sampled requests not traced because a plan was active
    guard: GuardStats
    control: ControlStats
    traced_serialised_waits: int = 0   # request opens that waited because a traced request runs alone
    work_on_serving_thread: int = 0    # run_model_work items (trials...) run by a serving thread
    work_on_control_thread: int = 0    # ... run by the control thread (no serving thread came)


class AgentHandle:
    def __init__(self, model: nn.Module, structure: ModelStructure, settings: AgentSettings,
                 sink: Sink, on_detach: Optional[Callable[[], None]] = None, *,
                 tracer_provider=None, meter_provider=None, executor: Optional[Executor] = None,
                 control: Optional[ControlHandler] = None, exporter=None,
                 model_info: Optional[ModelInfo] = None, agent_id: str = "",
                 gpu_status: str = "", target: Optional[str] = None):
        """tracer_provider: an OpenTelemetry TracerProvider for request spans; None = global.
        meter_provider: an OpenTelemetry MeterProvider for the request and exporter metrics
        (agent/observe/metrics.py); None = global (a no-op until the user sets one).
        control: bound here to this handle's request boundaries; replies go to exporter."""
        self.model = model
        self.structure = structure
        self.settings = settings
        self.executor = executor
        self.control = control
        self.exporter = exporter
        self.model_info = model_info
        self.agent_id = agent_id
        self.gpu_status = gpu_status
        self.target = target
        self._on_detach = on_detach
        self._errors = ErrorCount()
        self._tracker = RequestTracker(model, structure, settings, sink, self._errors,
                                       tracer_provider=tracer_provider,
                                       meter_provider=meter_provider,
                                       # HF name_or_path, else e.g. "LlamaForCausalLM"
                                       model_name=structure.name or structure.architecture)
        self._meter_provider = meter_provider
        if exporter is not None:
            observe_exporter(meter_provider, agent_id, exporter)
        self._tracker.attach()
        if executor is not None:       # sizes a static KV cache from the requests seen
            executor.longest_request_tokens = lambda: self._tracker.longest_tokens
        if control is not None:
            control.bind(self._tracker, exporter.send_reply if exporter is not None else None)
        self._attached = True

    def request(self, tenant: str = "", route: str = "", query_class: str = "") -> ContextManager[None]:
        """Bounds and labels one request; generate/forward calls inside it belong to it."""
        return self._tracker.request(tenant=tenant, route=route, query_class=query_class)

    # ------------------------------------------------------------ plans, locally
    def _control(self) -> ControlHandler:
        if self.control is None:
            raise RuntimeError("this handle has no executor (use agent.attach to get one)")
        return self.control

    def apply_plan(self, plan: PlanInput) -> ApplyReport:
        """Validates and applies `plan` (a Plan, its document, or its JSON) at the next request
        boundary, rolling back an active plan first. The control plane gets the PlanStatus
        reports too. Raises PlanError (refused; nothing touched) or the apply's error.

        A plan with `query_classes` is that classes' own plan, beside the default: weights and
        execution settings are process-wide, so it may differ from the active default plan
        only in execution.speculative (draft and k, or none); anything else is refused. Requests
        labelled `request(query_class=...)` with such a class speculate its way."""
        return self._control().apply_local(plan)

    def rollback(self, reason: str = "", query_class: str = "") -> wire.PlanStatusReport:
        """Rolls back the active plan at the next boundary (bitwise original); reported. With
        query_class: that class's own plan only (its requests then run the default plan)."""
        control = self._control()
        if query_class:
            reports = control.rollback_class(query_class, reason)
            for r in reports:
                control.reply(r)
            return reports[0]
        report = control.rollback(reason=reason)
        control.reply(report)
        return report

    def run_trial(self, plan: PlanInput, evalset: EvalSet | Mapping[str, Any],
                  latency_repeats: int = 3) -> Evidence:
        """Measures `plan` against the unoptimised model at the next boundary; the model ends
        as it was. evalset: an EvalSet, or an eval_json document (its latency_repeats wins)."""
        control = self._control()
        if not isinstance(evalset, EvalSet):     # traffic_prompts honoured as in a pushed trial
            return control.run_spec_trial(as_plan(plan), EvalSpec.from_doc(evalset))
        return control.run_trial(plan, evalset, latency_repeats)

    def serve_pending(self, timeout_s: float) -> int:
        """For an idle serving loop (no request to serve now): waits up to timeout_s for model
        work the control side posted (a trial, plan apply or rollback) and runs it on this
        thread, where it is measured as requests run; returns how many items ran. Raises
        RuntimeError inside a request, ValueError for a negative or non-finite timeout_s."""
        return self._tracker.serve_pending(timeout_s)

    @property
    def control_waiting(self) -> bool:
        """A plan, trial or guard check is waiting for the open requests to end, or for a
        serving thread to run it."""
        return self._tracker.control_waiting

    @property
    def active_plan(self) -> Optional[Plan]:
        return self.executor.active_plan if self.executor is not None else None

    @property
    def class_plans(self) -> dict[str, Plan]:
        """query class -> its own active plan (speculation only; see apply_plan). A class not
        listed runs the default plan (`active_plan`)."""
        if self.control is None:
            return {}
        return self.control.classes.plans()

    # ------------------------------------------------------------ counters
    @property
    def requests_seen(self) -> int:
        """Requests completed and handed to the sink (those with at least one forward)."""
        return self._tracker.requests_seen

    @property
    def errors(self) -> int:
        """Failures inside observation (hooks, sink), each caught and counted."""
        return self._errors.count

    def stats(self) -> HandleStats:
        c, t = self.control, self._tracker
        guard = c.guard.stats if c is not None and c.guard is not None else GuardStats()
        return HandleStats(requests_seen=self.requests_seen, errors=self.errors,
                           boundary_waits=self._tracker.boundary_waits,
                           traces_paused_skipped=self._tracker.traces_paused_skipped,
                           guard=replace(guard),
                           control=replace(c.stats) if c is not None else ControlStats(),
                           traced_serialised_waits=t.traced_serialised_waits,
                           work_on_serving_thread=t.work_sites[WorkSite.SERVING_THREAD],
                           work_on_control_thread=t.work_sites[WorkSite.CONTROL_THREAD])

    @property
    def attached(self) -> bool:
        return self._attached

    def detach(self) -> None:
        """Removes every hook and the generate wrapper, rolls back an active plan; idempotent."""
        if not self._attached:
            return
        self._attached = False
        try:
            # Roll back first, while the request hooks are still in place: a plan may have
            # wrapped what the tracker wrapped (speculative generate), and undoing it restores
            # the tracker's own wrapper, which the tracker's detach then removes.
            if self.control is not None:
                self.control.close()
        finally:
            self._tracker.detach()
            if self.exporter is not None:
                unobserve_exporter(self._meter_provider, self.exporter)
            if self._on_detach is not None:
                self._on_detach()
