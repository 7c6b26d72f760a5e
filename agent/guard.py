"""Live quality guard: while a plan is active, served requests are re-checked against the
unoptimised model, and a plan that disagrees too often is rolled back.

Every `guard_every_n_requests`-th finished request (counted while a plan is active), the
serving thread hands over a reference to that request's token ids (captured by the request
tracker: generate()'s output, or the forward inputs; the first sequence of a batch, at most the
last `guard_max_tokens` tokens). Nothing else happens on the serving thread; one sample waits at
most, later ones are dropped and counted while a check is pending.

The guard's thread then takes the next request boundary and runs those tokens teacher-forced
twice: with the plan, and inside `Executor.baseline()` (the original modules, without undoing
the plan's apply; on an accelerator the originals parked on the host travel to the device and
back for the check, so a check costs two short forwards plus that copy). Top-1 agreement of the next-token predictions below `guard_min_top1` is a
breach: `on_breach(plan, result)` runs while the boundary is still held, so no request is served
by the plan after the breach was seen.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.proto.plan import Plan
from headroom_sidecar.agent.settings import AgentSettings

log = logging.getLogger("headroom.guard")


@dataclass(frozen=True)
class GuardSample:
    request_id: int
    ids: torch.Tensor          # [1, T] token ids, a copy
    plan: Plan                 # the plan that served the request


@dataclass(frozen=True)
class GuardResult:
    request_id: int
    top1: float
    threshold: float
    tokens: int

    @property
    def breach(self) -> bool:
        return self.top1 < self.threshold


@dataclass
class GuardStats:
    checks: int = 0
    breaches: int = 0
    dropped: int = 0           # selected requests not checked: a check was pending, or no token ids
    stale: int = 0             # the plan changed before the check ran
    errors: int = 0


def sample_ids(output, max_tokens: int) -> Optional[torch.Tensor]:
    """[1, T <= max_tokens] int64 copy of the first sequence in a generate() output or input ids."""
    ids = getattr(output, "sequences", output)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
        return None
    row = ids if ids.dim() == 1 else ids[0]                         # [T]
    if row.shape[0] < 2:
        return None
    return row[-max_tokens:].detach().clone().unsqueeze(0)          # [1, T]


@torch.no_grad()
def _top1(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return getattr(out, "logits", out)[0].argmax(-1)                # [T]


def top1_agreement(model: nn.Module, executor: Executor, ids: torch.Tensor) -> float:
    """Fraction of positions where the plan and the unoptimised model predict the same token."""
    planned = _top1(model, ids)
    with executor.baseline():
        base = _top1(model, ids)
    return float((planned == base).float().mean())


class QualityGuard:
    def __init__(self, model: nn.Module, executor: Executor, settings: AgentSettings,
                 boundary: Callable[[], ContextManager[None]],
                 on_breach: Callable[[Plan, GuardResult], None]):
        self._model, self._executor = model, executor
        self._every_n, self._threshold = settings.guard_every_n_requests, settings.guard_min_top1
        self._max_tokens = settings.guard_max_tokens
        self._boundary, self._on_breach = boundary, on_breach
        self._device = next(model.parameters()).device
        self._plan: Optional[Plan] = None
        self._seen = 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self.stats = GuardStats()
        self.last: Optional[GuardResult] = None
        self._thread = threading.Thread(target=self._run, name="headroom-guard", daemon=True)
        self._thread.start()

    def watch(self, plan: Optional[Plan]) -> None:
        """The plan now serving (None: nothing to guard); restarts the request count."""
        if plan is not self._plan:
            self._plan, self._seen = plan, 0

    # ------------------------------------------------------------ serving thread: O(1)
    def on_request_finished(self, request_id: int, token_ids) -> None:
        plan = self._plan
        if plan is None or self._every_n == 0:
            return
        self._seen += 1
        if self._seen % self._every_n:
            return
        ids = sample_ids(token_ids, self._max_tokens)
        if ids is None:
            self.stats.dropped += 1
            return
        try:
            self._queue.put_nowait(GuardSample(request_id, ids, plan))
        except queue.Full:
            self.stats.dropped += 1

    # ------------------------------------------------------------ guard thread
    def _run(self) -> None:
        while True:
            sample = self._queue.get()
            if sample is None:
                return
            try:
                self.check(sample)
            except Exception:   # the guard must never take the agent down
                self.stats.errors += 1
                log.exception("headroom guard: check of request %d failed", sample.request_id)

    def check(self, sample: GuardSample) -> Optional[GuardResult]:
        """Runs one check at the next boundary; None if the plan changed since the request."""
        with self._boundary():
            if self._executor.active_plan is not sample.plan:
                self.stats.stale += 1
                return None
            top1 = top1_agreement(self._model, self._executor, sample.ids.to(self._device))
            result = GuardResult(sample.request_id, top1, self._threshold, sample.ids.shape[1])
            self.stats.checks += 1
            self.last = result
            if result.breach:
                self.stats.breaches += 1
                self._on_breach(sample.plan, result)
        return result

    def close(self, timeout_s: float = 5.0) -> None:
        self._plan = None
        try:
            self._queue.get_nowait()          # a pending check no longer matters
        except queue.Empty:
            pass
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
