"""Request boundaries and cheap per-request metrics; starts a full trace for sampled requests.

A request is, per thread, whichever is outermost: a `with tracker.request(...)` block, one call
of the model instance's `generate`, or one top-level `forward` call. Everything nested on the
same thread belongs to it; a forward on another thread is that thread's own request. Only two
hooks live on the model permanently, on its top-level module (forward pre-hook and forward
hook); per-layer hooks exist only while a sampled request runs (see trace.py). Per forward the
hooks read a few thread-local attributes and take no lock; a lock is taken per request.

Concurrency (gate.py): untraced requests hold the model shared and run concurrently. Traced
requests hold it exclusively, because per-layer hooks are per module, not per thread: another
thread's forwards would be counted into the trace. That is the price of sampling: while a
traced request runs, requests on other threads wait for it (and it waits for those already in);
each such wait is counted in `traced_serialised_waits`. At sample_rate 0.05 and N concurrent
threads, about 5% of requests briefly serialise the model.

Control work (plan apply, rollback, trial, quality guard) holds the model exclusively, so it
changes or runs the model only between requests: it waits for the open requests to end, and
requests arriving meanwhile queue behind it, then get in before any later control work (a
serving loop waits at most one trial / apply / guard check). The control side parses,
tokenises and replies outside; it holds the model only for model work. Two ways in:
`boundary()` runs on the calling thread; `run_model_work(fn)` prefers a serving thread (the
next request to open runs fn first, or an idle loop in `serve_pending()`), because on a CPU
torch work on another Python thread runs its own OpenMP team and fights the serving thread's.
Model calls made by the thread doing control work are not requests: neither recorded nor traced.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.agent.executor.speculative import perrequest
from headroom_sidecar.agent.executor.speculative.generate import SpecStats
from headroom_sidecar.agent.fingerprint import execution_device
from headroom_sidecar.agent.observe.gate import Holder, ModelGate
from headroom_sidecar.agent.observe.handoff import Work, WorkQueue, WorkSite, check_seconds
from headroom_sidecar.agent.observe.metrics import RequestMetrics
from headroom_sidecar.agent.observe.prompts import RecentPrompts
from headroom_sidecar.agent.observe.spans import emit_request_span, gen_ai_base, request_tracer
from headroom_sidecar.agent.observe.trace import TraceCollector
from headroom_sidecar.agent.records import RequestRecord
from headroom_sidecar.agent.settings import AgentSettings

log = logging.getLogger(__name__)

Sink = Callable[[RequestRecord], None]
T = TypeVar("T")

__all__ = ["ErrorCount", "Labels", "Owner", "RequestTracker", "Sink", "WorkSite"]


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


@dataclass(eq=False)
class _Request:
    request_id: int
    owner: Owner
    labels: Labels
    ticket: int                          # ModelGate ticket, released at close
    start_ns: int                        # perf_counter_ns
    start_unix_ns: int
    trace: Optional[TraceCollector]
    forwards: int = 0                    # completed top-level forwards (decode steps)
    started_forwards: int = 0
    rows: int = 1                        # B of the first top-level forward's input
    padded_tokens: int = 0               # T of the first top-level forward's input (with padding)
    # [2] int64 on the input's device: (real prompt tokens, rows with a real token), from the
    # attention mask; reduced at the first forward, read at emit (no sync on the way in).
    mask_counts: Optional[torch.Tensor] = None
    prompt_mask: Optional[torch.Tensor] = None   # generate()'s attention_mask kwarg, [B, T]
    first_end_ns: int = 0
    last_end_ns: int = 0
    # Token ids for the quality guard, captured only while `capture_ids` is on: references,
    # no copies: generate()'s return value, else the first and last top-level forward inputs.
    output: object = None
    first_input: Optional[torch.Tensor] = None
    last_input: Optional[torch.Tensor] = None
    prompt_ids: Optional[torch.Tensor] = None   # first forward's input ids (a labelled B=1 request)
    error: Optional[BaseException] = None    # what the request's model call raised, if it did
    spec: Optional[SpecStats] = None     # speculation figures (None: it did not speculate)

    def token_ids(self):
        """generate()'s output, else the longer of the first and last forward inputs."""
        if self.output is not None:
            return self.output
        first, last = self.first_input, self.last_input
        if last is not None and (first is None or last.shape[-1] >= first.shape[-1]):
            return last
        return first

    def real_counts(self) -> tuple[int, int]:
        """(prompt tokens without padding, sequences with at least one real prompt token)."""
        if self.mask_counts is None:
            return self.rows * self.padded_tokens, self.rows
        tokens, rows = self.mask_counts.tolist()
        return int(tokens), int(rows)


class _ThreadState(threading.local):
    """This thread's request state; class attributes are each thread's initial values."""
    active: Optional[_Request] = None    # the open request of this thread
    depth: int = 0                       # nesting of the top-level module's forward
    control: int = 0                     # > 0 while this thread does control work (boundary)
    served: bool = False                 # this thread has opened a request: a serving thread


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


def _mask_counts(mask, rows: int) -> Optional[torch.Tensor]:
    """[2] (ones, rows with a one) of a [rows, T] padding mask, on its device; None otherwise
    (no mask, or a 4-D / custom mask we cannot read as padding)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != rows:
        return None
    per_row = (mask != 0).sum(dim=1)                       # [B]
    return torch.stack([per_row.sum(), (per_row > 0).sum()])


@contextlib.contextmanager
def _fresh_thread_modes(device_type: str) -> Iterator[None]:
    """Control work sees the grad / inference / autocast modes of a fresh thread, wherever it
    runs (they are thread-local, and a serving thread may be inside inference_mode)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


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
                 sink: Sink, errors: ErrorCount, tracer_provider=None, meter_provider=None,
                 model_name: str = ""):
        self._model, self._structure, self._settings = model, structure, settings
        self._sink, self._errors = sink, errors
        self._tracer = request_tracer(tracer_provider)
        self._gen_ai = gen_ai_base(model_name)       # gen_ai.* attributes shared by every request
        self._metrics = RequestMetrics(meter_provider, self._gen_ai)
        self._rng = random.Random(settings.sample_seed)
        self._ids = itertools.count(1)
        self._device = execution_device(model)
        self._local = _ThreadState()
        self._gate = ModelGate()
        self._work = WorkQueue()
        self._open_requests: dict[int, _Request] = {}     # request_id -> open request, any thread
        self._stats_lock = threading.Lock()
        self._hooks: list = []
        self._attached = False
        self._saved_generate = None     # an instance attribute `generate` that was there before
        self.requests_seen = 0
        self.longest_tokens = 0         # padded prompt + output tokens per sequence, longest seen
        self.boundary_waits = 0         # control work that found the model busy (request or control)
        self.traced_serialised_waits = 0  # request opens that waited because tracing serialises
        self.work_sites = {site: 0 for site in WorkSite}   # run_model_work items run, by site
        # While a plan is active the adapter's structure no longer matches the swapped modules:
        # sampled requests get cheap metrics only, counted in traces_paused_skipped.
        self.traces_paused = False
        self.traces_paused_skipped = 0
        self.capture_ids = False        # keep token id references for on_finished (guard)
        self.recent_prompts = RecentPrompts(settings.recent_prompts_per_class)
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
        self._attached = True

    def detach(self) -> None:
        self._attached = False
        for h in self._hooks:
            h.remove()
        self._hooks = []
        m = self._model
        if getattr(m.__dict__.get("generate"), "__headroom_wrapper__", False):
            del m.generate
            if self._saved_generate is not None:
                m.generate = self._saved_generate
        for req in list(self._open_requests.values()):   # detached mid-request: drop, no hooks left
            self._finish(req, emit=False)

    def _note_output(self, req: Optional[_Request], out):
        if self.capture_ids and req is not None:
            req.output = out
        return out

    def _wrap_generate(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def generate(*args, **kwargs):
            st = self._local
            if st.control:
                return original(*args, **kwargs)
            if st.active is not None:
                return self._note_output(st.active, original(*args, **kwargs))
            req = self._open(Owner.GENERATE, Labels(), st)
            if req is not None:
                req.prompt_mask = kwargs.get("attention_mask")
            try:
                return self._note_output(req, original(*args, **kwargs))
            except BaseException as exc:
                if req is not None:
                    req.error = exc
                raise
            finally:
                self._close(req, st)
        generate.__headroom_wrapper__ = True
        return generate

    # --- control work ---------------------------------------------------------------------

    @contextlib.contextmanager
    def boundary(self) -> Iterator[None]:
        """Holds the model exclusively between requests, on this thread (waits for the open
        requests to end). Re-entrant for its holder; raises on a thread inside a request, which
        would wait for itself."""
        st = self._local
        if st.control:
            yield
            return
        if st.active is not None:
            raise RuntimeError("headroom: plans and trials run between requests; this thread is "
                               "inside a request (call it after the request ends)")
        ticket, blockers = self._gate.acquire(Holder.CONTROL)
        if blockers:
            with self._stats_lock:
                self.boundary_waits += 1
        st.control += 1
        try:
            yield
        finally:
            st.control -= 1
            self._gate.release(ticket)

    @property
    def control_waiting(self) -> bool:
        """Control work is waiting for the open requests to end, or posted for a serving thread."""
        return self._gate.control_waiting or self._work.pending

    def run_model_work(self, fn: Callable[[], T], *, handoff_s: float) -> tuple[T, WorkSite]:
        """Runs fn with the model held exclusively, between requests, preferably on a thread that
        serves requests. Posts fn; the first of: (a) a serving thread opening its next request runs
        fn first (that request waits, as it waited for the boundary before), (b) a serving thread
        calling `serve_pending(timeout_s)` runs it, (c) after handoff_s with neither, the calling
        thread runs it itself (WorkSite.CONTROL_THREAD). Called on a thread that is itself a serving
        thread (it has served a request, not inside one): runs inline as SERVING_THREAD.
        fn's exception propagates to the caller. Model calls made inside fn are not requests.

        Also inline: on a thread already doing control work (inside boundary() or fn), and once
        the tracker is detached (no request will come). fn runs with a fresh thread's grad /
        inference / autocast modes wherever it runs."""
        handoff_s = check_seconds("handoff_s", handoff_s)
        st = self._local
        if st.served or st.control or not self._attached:
            site = WorkSite.SERVING_THREAD if st.served else WorkSite.CONTROL_THREAD
            work = Work(fn)
            self._run_work(work, st, site)
            return work.outcome()
        work = self._work.post(fn)
        if not work.claimed.wait(handoff_s) and self._work.withdraw(work):
            self._run_work(work, st, WorkSite.CONTROL_THREAD)
        work.done.wait()
        return work.outcome()

    def serve_pending(self, timeout_s: float) -> int:
        """For an idle serving loop: waits up to timeout_s for posted model work and runs it on
        this thread; returns how many items ran."""
        timeout_s = check_seconds("timeout_s", timeout_s)
        st = self._local
        if st.active is not None:
            raise RuntimeError("headroom: serve_pending() runs model work between requests; this "
                               "thread is inside a request (call it after the request ends)")
        st.served = True
        if not self._work.wait(timeout_s):
            return 0
        return self._serve_posted(st)

    def _serve_posted(self, st: _ThreadState) -> int:
        ran = 0
        while (work := self._work.claim()) is not None:
            self._run_work(work, st, WorkSite.SERVING_THREAD)
            ran += 1
        return ran

    def _run_work(self, work: Work, st: _ThreadState, site: WorkSite) -> None:
        """Runs work.fn here, holding the model; never raises (the poster gets the error)."""
        work.site, work.thread_ident = site, threading.get_ident()
        try:
            with self.boundary(), _fresh_thread_modes(self._device.type):
                work.result = work.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the poster's thread
            work.error = exc
        finally:
            with self._stats_lock:
                self.work_sites[site] += 1
            work.done.set()

    # --- request boundaries ---------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, tenant: str = "", route: str = "", query_class: str = "") -> Iterator[None]:
        """Labels and bounds one request; a nested call joins the open request (labels ignored)."""
        st = self._local
        if st.active is not None or st.control:
            yield
            return
        req = self._open(Owner.CONTEXT, Labels(tenant, route, query_class), st)
        try:
            yield
        except BaseException as exc:
            if req is not None:
                req.error = exc
            raise
        finally:
            self._close(req, st)

    def current_query_class(self) -> str:
        """The query class of this thread's open request ("" outside one, or unlabelled): what
        per-class plans route on."""
        req = self._local.active
        return req.labels.query_class if req is not None else ""

    def _open(self, owner: Owner, labels: Labels, st: _ThreadState) -> Optional[_Request]:
        """Opens this thread's request: first runs model work posted for a serving thread, then
        waits for the gate (shared if untraced, exclusive if traced). None if that failed."""
        st.served = True
        perrequest.take()          # figures of generate calls outside any request are not its
        if self._work.pending:
            self._serve_posted(st)
        try:
            traced = self._rng.random() < self._settings.sample_rate
            if traced and self.traces_paused:
                traced = False
                with self._stats_lock:
                    self.traces_paused_skipped += 1
            holder = Holder.TRACED if traced else Holder.REQUEST
            ticket, blockers = self._gate.acquire(holder)
        except Exception as exc:  # noqa: BLE001 - never raise into the caller's model call
            self._errors(exc)
            return None
        if Holder.TRACED in blockers or (traced and Holder.REQUEST in blockers):
            with self._stats_lock:
                self.traced_serialised_waits += 1
        req = _Request(next(self._ids), owner, labels, ticket, time.perf_counter_ns(),
                       time.time_ns(), None)
        if traced:
            try:
                req.trace = TraceCollector(self._structure, self._device,
                                           self._settings.attn_decode_stride, self._errors)
            except Exception as exc:  # noqa: BLE001 - the request goes on untraced
                self._errors(exc)
        self._open_requests[req.request_id] = req
        st.active = req
        return req

    def _close(self, req: Optional[_Request], st: _ThreadState, emit: bool = True) -> None:
        if req is None:
            return
        if st.active is req:
            st.active = None
        req.spec = perrequest.take()     # on the request's own thread: its own figures
        self._finish(req, emit)

    def _finish(self, req: _Request, emit: bool) -> None:
        """Ends `req` once (its thread, or detach on any thread), then emits its record."""
        if self._open_requests.pop(req.request_id, None) is None:
            return                                    # already finished (detach got there first)
        try:
            end_ns = time.perf_counter_ns()
            # Before the gate opens: trace hooks sit on modules a plan may swap out.
            trace = req.trace.finish() if req.trace is not None else None
        except Exception as exc:  # noqa: BLE001
            if req.trace is not None:
                req.trace.remove_hooks()
            self._errors(exc)
            return
        finally:
            self._gate.release(req.ticket)
        if not (emit and req.forwards > 0):
            if emit and req.error is not None:
                self._emit_failed(req, end_ns)
            return
        try:
            self._emit(req, end_ns, trace)
            if self.on_finished is not None:
                self.on_finished(req.request_id, req.token_ids())
        except Exception as exc:  # noqa: BLE001
            self._errors(exc)

    # --- top-level hooks (always on: a few thread-local attribute updates per forward) ----

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self._local
        if st.control:
            return None
        st.depth += 1
        if st.depth != 1:
            return None
        try:
            req = st.active if st.active is not None else self._open(Owner.FORWARD, Labels(), st)
            if req is None:
                return None
            if req.started_forwards == 0:
                self._note_prompt(req, args, kwargs)
                if req.labels.query_class and req.rows == 1 and self.recent_prompts.per_class:
                    ids = _input_ids(args, kwargs)                       # a reference: [1, T]
                    req.prompt_ids = ids if isinstance(ids, torch.Tensor) else None
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

    @staticmethod
    def _note_prompt(req: _Request, args: tuple, kwargs: dict) -> None:
        """Prompt size from the first top-level forward: padded shape now, real counts from the
        forward's 2-D attention mask, else generate()'s (reduced on device, read at emit)."""
        req.rows, req.padded_tokens = _input_shape(args, kwargs)
        counts = _mask_counts(kwargs.get("attention_mask"), req.rows)
        if counts is None:
            counts = _mask_counts(req.prompt_mask, req.rows)
        req.mask_counts, req.prompt_mask = counts, None

    def _post_forward(self, module: nn.Module, args: tuple, output) -> None:
        # always_call: runs even when forward raised, with output None, so the depth stays right.
        st = self._local
        if st.control:
            return None
        st.depth = max(0, st.depth - 1)
        req = st.active
        if st.depth != 0 or req is None:
            return None
        now_ns = time.perf_counter_ns()
        if req.trace is not None:
            req.trace.end_forward()
        if output is not None:
            req.forwards += 1
            req.first_end_ns = req.first_end_ns or now_ns
            req.last_end_ns = now_ns
        else:       # forward raised: torch runs always_call hooks inside its except block
            req.error = req.error or sys.exc_info()[1]
        if req.owner is Owner.FORWARD:
            self._close(req, st)
        return None

    # --- the record -----------------------------------------------------------------------

    def _emit(self, req: _Request, end_ns: int, trace) -> None:
        n = req.forwards
        if req.spec is not None and req.spec.emitted:
            # Speculation: a forward is a verify (or a self draft's step), not one token.
            n = req.spec.emitted
        prompt_tokens, sequences = req.real_counts()
        tpot_ms = (req.last_end_ns - req.first_end_ns) / (n - 1) / 1e6 if n >= 2 else math.nan
        rec = RequestRecord(
            request_id=req.request_id, start_unix_us=req.start_unix_ns // 1000,
            tenant=req.labels.tenant, route=req.labels.route, query_class=req.labels.query_class,
            batch_size=sequences, prompt_tokens=prompt_tokens, output_tokens=n * sequences,
            ttft_ms=(req.first_end_ns - req.start_ns) / 1e6, tpot_ms=tpot_ms,
            latency_ms=(end_ns - req.start_ns) / 1e6, trace=trace, **_spec_fields(req.spec))
        with self._stats_lock:
            self.requests_seen += 1
            self.longest_tokens = max(self.longest_tokens, req.padded_tokens + n)
        try:
            self._sink(rec)
        except Exception as exc:  # noqa: BLE001 - a broken sink must not break serving
            self._errors(exc)
        self._span_and_metrics(req, rec, end_ns)
        self._remember_prompt(req, prompt_tokens)

    def _remember_prompt(self, req: _Request, prompt_tokens: int) -> None:
        """A labelled single-sequence request that ran without padding: its prompt, for trials
        on the class's own traffic (observe/prompts.py)."""
        if req.prompt_ids is None or req.error is not None or prompt_tokens != req.padded_tokens:
            return
        try:
            self.recent_prompts.add(req.labels.query_class, req.prompt_ids)
        except Exception as exc:  # noqa: BLE001 - never break serving over this
            self._errors(exc)

    def _span_and_metrics(self, req: _Request, rec: RequestRecord, end_ns: int) -> None:
        emit_request_span(self._tracer, rec, req.start_unix_ns + (end_ns - req.start_ns),
                          self._gen_ai, req.error)
        self._metrics.record(rec, req.error)

    def _emit_failed(self, req: _Request, end_ns: int) -> None:
        """A request whose model call raised before any forward completed: no record for the
        sink (nothing was measured), only its span (ERROR) and duration metric."""
        try:
            rec = RequestRecord(
                request_id=req.request_id, start_unix_us=req.start_unix_ns // 1000,
                tenant=req.labels.tenant, route=req.labels.route,
                query_class=req.labels.query_class, batch_size=0,
                latency_ms=(end_ns - req.start_ns) / 1e6)
            self._span_and_metrics(req, rec, end_ns)
        except Exception as exc:  # noqa: BLE001
            self._errors(exc)


def _spec_fields(spec: Optional[SpecStats]) -> dict:
    """RequestRecord's speculation columns (all 0: the request did not speculate)."""
    if spec is None:
        return {}
    return {"spec_drafted": spec.proposed, "spec_accepted": spec.accepted,
            "spec_verify_forwards": spec.verify_forwards}
