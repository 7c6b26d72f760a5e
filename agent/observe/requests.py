"""Request boundaries and cheap per-request metrics; starts a full trace for sampled requests.

A request is, whichever is outermost: a `with tracker.request(...)` block, one call of the
model instance's `generate`, or one top-level `forward` call. Everything nested belongs to it.
Only two hooks live on the model permanently, on its top-level module (forward pre-hook and
forward hook); per-layer hooks exist only while a sampled request runs (see trace.py).

Not thread-safe: one request at a time per model. Forwards from another thread while a
request is open are counted into that request.

Request boundaries (the executor's only windows): every request holds `_boundary` from open to
close. A control thread (plan apply, rollback, trial, quality guard) takes it with
`boundary()`, so it changes or runs the model only between requests. The serving thread never
waits on network or disk because of this: the control side parses, tokenises and replies
outside the boundary and holds it only for model work. A turnstile makes the handoff fair: a
control thread waiting for the boundary gets it at the next request end, and a serving loop
then waits at its next request open for at most that one trial / apply / guard check.
Model calls made by the thread holding the boundary are not requests: they are neither
recorded nor traced.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from agent.adapters.base import ModelStructure
from agent.observe.spans import emit_request_span, request_tracer
from agent.observe.trace import TraceCollector
from agent.records import RequestRecord
from agent.settings import AgentSettings

log = logging.getLogger(__name__)

Sink = Callable[[RequestRecord], None]


class Owner(enum.Enum):
    """What opened the request, hence what closes it."""
    CONTEXT = "context"
    GENERATE = "generate"
    FORWARD = "forward"


@dataclass(frozen=True)
class Labels:
    tenant: str = ""
    route: str = ""
    query_class: str = ""


@dataclass
class _Request:
    request_id: int
    owner: Owner
    labels: Labels
    start_ns: int                        # perf_counter_ns
    start_unix_ns: int
    trace: Optional[TraceCollector]
    forwards: int = 0                    # completed top-level forwards
    started_forwards: int = 0
    batch_size: int = 1
    prompt_tokens: int = 0
    first_end_ns: int = 0
    last_end_ns: int = 0
    # Token ids for the quality guard, captured only while `capture_ids` is on: references,
    # no copies: generate()'s return value, else the first and last top-level forward inputs.
    output: object = None
    first_input: Optional[torch.Tensor] = None
    last_input: Optional[torch.Tensor] = None

    def token_ids(self):
        """generate()'s output, else the longer of the first and last forward inputs."""
        if self.output is not None:
            return self.output
        first, last = self.first_input, self.last_input
        if last is not None and (first is None or last.shape[-1] >= first.shape[-1]):
            return last
        return first


def _input_ids(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    x = kwargs.get("input_ids", kwargs.get("idx", args[0] if args else None))
    return x if isinstance(x, torch.Tensor) else None


def _input_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    """(batch, tokens) of a forward's input ids (or embeddings); (1, 0) if neither is found."""
    x = _input_ids(args, kwargs)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return 1, 0
    return int(x.shape[0]), int(x.shape[1])


FinishedCallback = Callable[[int, object], None]


@dataclass
class ErrorCount:
    count: int = 0
    last: Optional[BaseException] = field(default=None, repr=False)

    def __call__(self, exc: BaseException) -> None:
        if self.count == 0:
            log.warning("headroom: observation failed; the request continues untraced", exc_info=exc)
        self.count += 1
        self.last = exc


class RequestTracker:
    def __init__(self, model: nn.Module, structure: ModelStructure, settings: AgentSettings,
                 sink: Sink, errors: ErrorCount, tracer_provider=None):
        self._model, self._structure, self._settings = model, structure, settings
        self._sink, self._errors = sink, errors
        self._tracer = request_tracer(tracer_provider)
        self._rng = random.Random(settings.sample_seed)
        self._ids = itertools.count(1)
        self._device = next(model.parameters()).device
        self._active: Optional[_Request] = None
        self._depth = 0                 # nesting of the top-level module's forward
        self._hooks: list = []
        self._saved_generate = None     # an instance attribute `generate` that was there before
        self.requests_seen = 0
        self.longest_tokens = 0         # prompt + output tokens of the longest request seen
        # Boundaries (module docstring). Lock, not RLock: a request may close on another thread.
        self._turnstile, self._boundary = threading.Lock(), threading.Lock()
        self._control_thread: Optional[int] = None    # holder of boundary(), if any
        self._request_thread: Optional[int] = None    # thread that opened the active request
        self._control_waiting = 0
        self.boundary_waits = 0         # boundary() calls that found the model busy (request or control)
        # While a plan is active the adapter's structure no longer matches the swapped modules:
        # sampled requests get cheap metrics only, counted in traces_paused_skipped.
        self.traces_paused = False
        self.traces_paused_skipped = 0
        self.capture_ids = False        # keep token id references for on_finished (guard)
        self.on_finished: Optional[FinishedCallback] = None   # (request_id, token ids)

    # --- attach / detach ------------------------------------------------------------------

    def attach(self) -> None:
        m = self._model
        self._hooks = [m.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       m.register_forward_hook(self._post_forward, always_call=True)]
        original = getattr(m, "generate", None)
        if callable(original):
            self._saved_generate = m.__dict__.get("generate")
            m.generate = self._wrap_generate(original)

    def _note_output(self, req: Optional[_Request], out):
        if self.capture_ids and req is not None:
            req.output = out
        return out

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        m = self._model
        if getattr(m.__dict__.get("generate"), "__headroom_wrapper__", False):
            del m.generate
            if self._saved_generate is not None:
                m.generate = self._saved_generate
        if self._active is not None:      # detached mid-request: drop it, leave no hooks
            self._close(self._active, emit=False)

    def _wrap_generate(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def generate(*args, **kwargs):
            if self._bypass():
                return original(*args, **kwargs)
            if self._active is not None:
                return self._note_output(self._active, original(*args, **kwargs))
            req = self._open(Owner.GENERATE, Labels())
            try:
                return self._note_output(req, original(*args, **kwargs))
            finally:
                self._close(req)
        generate.__headroom_wrapper__ = True
        return generate

    # --- control boundaries ---------------------------------------------------------------

    @contextlib.contextmanager
    def boundary(self) -> Iterator[None]:
        """Holds the model between two requests (waits for the open one to end). Re-entrant
        for its holder; raises on the thread of an open request, which would wait for itself."""
        me = threading.get_ident()
        if self._control_thread == me:
            yield
            return
        if self._active is not None and self._request_thread == me:
            raise RuntimeError("headroom: plans and trials run between requests; this thread is "
                               "inside a request (call it after the request ends)")
        self._control_waiting += 1
        try:
            with self._turnstile:
                if not self._boundary.acquire(blocking=False):
                    self.boundary_waits += 1
                    self._boundary.acquire()
        finally:
            self._control_waiting -= 1
        self._control_thread = me
        try:
            yield
        finally:
            self._control_thread = None
            self._boundary.release()

    @property
    def control_waiting(self) -> bool:
        """A control thread is waiting for the open request to end."""
        return self._control_waiting > 0

    def _bypass(self) -> bool:
        """This thread holds boundary(): its model calls are control work, not requests."""
        return self._control_thread is not None and self._control_thread == threading.get_ident()

    def _enter_boundary(self) -> None:
        with self._turnstile:
            self._boundary.acquire()
        self._request_thread = threading.get_ident()

    def _leave_boundary(self) -> None:
        self._request_thread = None
        self._boundary.release()

    # --- request boundaries ---------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, tenant: str = "", route: str = "", query_class: str = "") -> Iterator[None]:
        """Labels and bounds one request; a nested call joins the open request (labels ignored)."""
        if self._active is not None or self._bypass():
            yield
            return
        req = self._open(Owner.CONTEXT, Labels(tenant, route, query_class))
        try:
            yield
        finally:
            self._close(req)

    def _open(self, owner: Owner, labels: Labels) -> Optional[_Request]:
        self._enter_boundary()
        try:
            traced = self._rng.random() < self._settings.sample_rate
            if traced and self.traces_paused:
                traced = False
                self.traces_paused_skipped += 1
            trace = TraceCollector(self._structure, self._device, self._settings.attn_decode_stride,
                                   self._errors) if traced else None
            self._active = _Request(next(self._ids), owner, labels, time.perf_counter_ns(),
                                    time.time_ns(), trace)
        except Exception as exc:  # noqa: BLE001 - never raise into the caller's model call
            self._errors(exc)
            self._active = None
            self._leave_boundary()
        return self._active

    def _close(self, req: Optional[_Request], emit: bool = True) -> None:
        if req is None or req is not self._active:
            return
        self._active = None
        try:
            end_ns = time.perf_counter_ns()
            # Before the boundary opens: trace hooks sit on modules a plan may swap out.
            trace = req.trace.finish() if req.trace is not None else None
        except Exception as exc:  # noqa: BLE001
            if req.trace is not None:
                req.trace.remove_hooks()
            self._errors(exc)
            return
        finally:
            self._leave_boundary()
        if not (emit and req.forwards > 0):
            return
        try:
            self._emit(req, end_ns, trace)
            if self.on_finished is not None:
                self.on_finished(req.request_id, req.token_ids())
        except Exception as exc:  # noqa: BLE001
            self._errors(exc)

    # --- top-level hooks (always on: a few attribute updates per forward) -----------------

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._control_thread is not None and self._bypass():
            return None
        self._depth += 1
        if self._depth != 1:
            return None
        try:
            req = self._active if self._active is not None else self._open(Owner.FORWARD, Labels())
            if req is None:
                return None
            if req.started_forwards == 0:
                req.batch_size, req.prompt_tokens = _input_shape(args, kwargs)
            if self.capture_ids:
                ids = _input_ids(args, kwargs)
                if req.started_forwards == 0:
                    req.first_input = ids
                req.last_input = ids
            if req.trace is not None:
                req.trace.begin_forward(req.started_forwards)
            req.started_forwards += 1
        except Exception as exc:  # noqa: BLE001
            self._errors(exc)
        return None

    def _post_forward(self, module: nn.Module, args: tuple, output) -> None:
        # always_call: runs even when forward raised, with output None, so the depth stays right.
        if self._control_thread is not None and self._bypass():
            return None
        self._depth = max(0, self._depth - 1)
        req = self._active
        if self._depth != 0 or req is None:
            return None
        now_ns = time.perf_counter_ns()
        if req.trace is not None:
            req.trace.end_forward()
        if output is not None:
            req.forwards += 1
            req.first_end_ns = req.first_end_ns or now_ns
            req.last_end_ns = now_ns
        if req.owner is Owner.FORWARD:
            self._close(req)
        return None

    # --- the record -----------------------------------------------------------------------

    def _emit(self, req: _Request, end_ns: int, trace) -> None:
        n = req.forwards
        tpot_ms = (req.last_end_ns - req.first_end_ns) / (n - 1) / 1e6 if n >= 2 else math.nan
        rec = RequestRecord(
            request_id=req.request_id, start_unix_us=req.start_unix_ns // 1000,
            tenant=req.labels.tenant, route=req.labels.route, query_class=req.labels.query_class,
            batch_size=req.batch_size, prompt_tokens=req.prompt_tokens, output_tokens=n,
            ttft_ms=(req.first_end_ns - req.start_ns) / 1e6, tpot_ms=tpot_ms,
            latency_ms=(end_ns - req.start_ns) / 1e6, trace=trace)
        self.requests_seen += 1
        self.longest_tokens = max(self.longest_tokens, req.prompt_tokens + n)
        try:
            self._sink(rec)
        except Exception as exc:  # noqa: BLE001 - a broken sink must not break serving
            self._errors(exc)
        emit_request_span(self._tracer, rec, req.start_unix_ns + (end_ns - req.start_ns))
