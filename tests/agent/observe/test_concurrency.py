"""Requests from several threads on one model: separate records, untraced ones concurrent,
traced ones serialised; control work handed to a serving thread (run_model_work)."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.observe.requests import WorkSite
from headroom_sidecar.agent.settings import AgentSettings
from tests.agent.test_exporter import wait_until
from tests.builders import tiny_llama, token_ids

THREADS = 8
TRACE_ALL = AgentSettings(sample_rate=1.0, attn_decode_stride=2)
TRACE_NONE = AgentSettings(sample_rate=0.0)


def _attach(model, settings):
    records = []
    return AgentHandle(model, resolve_structure(model), settings, records.append), records


def _prompt(i: int) -> torch.Tensor:
    return token_ids(3 + i, seed=10 + i)                       # [1, 3 + i]: lengths tell apart


def _generate(model, i: int) -> torch.Tensor:
    ids = _prompt(i)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=2 + i % 3, pad_token_id=0)


def _run_threads(target, n: int = THREADS) -> list:
    """Runs target(i) on n threads released together; returns results, re-raises errors."""
    start, out, errors = threading.Barrier(n, timeout=30), [None] * n, []

    def run(i):
        try:
            start.wait()
            out[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported on the test's thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def _rendezvous_in_layer(model, parties: int = 2) -> tuple[list, object]:
    """A layer-0 pre-hook where the first `parties` threads wait for each other: they all pass
    only if they are inside a forward at the same time. Returns (outcomes, hook handle)."""
    barrier, seen, lock, outcomes = threading.Barrier(parties, timeout=10), set(), threading.Lock(), []

    def hook(module, args):
        me = threading.get_ident()
        with lock:
            first = me not in seen and len(seen) < parties
            seen.add(me)
        if first:
            try:
                barrier.wait()
                outcomes.append("met")
            except threading.BrokenBarrierError:
                outcomes.append("alone")
    return outcomes, model.model.layers[0].register_forward_pre_hook(hook)


def _assert_records_match(records, bare: list[torch.Tensor], traced: bool) -> None:
    assert len(records) == THREADS and len({r.request_id for r in records}) == THREADS
    by_prompt = {r.prompt_tokens: r for r in records}
    for i, out in enumerate(bare):
        rec = by_prompt[3 + i]
        assert (rec.batch_size, rec.output_tokens) == (1, out.shape[1] - (3 + i))
        assert rec.traced == traced and 0 < rec.ttft_ms <= rec.latency_ms


def test_eight_threads_generating_at_once_are_eight_concurrent_requests():
    model = tiny_llama()
    bare = [_generate(model, i) for i in range(THREADS)]
    handle, records = _attach(model, TRACE_NONE)
    met, probe = _rendezvous_in_layer(model)
    outs = _run_threads(lambda i: _generate(model, i))
    probe.remove()
    assert met == ["met", "met"]                      # two threads inside forwards at once
    assert all(torch.equal(o, b) for o, b in zip(outs, bare))
    _assert_records_match(records, bare, traced=False)
    stats = handle.stats()
    assert handle.errors == 0 and stats.requests_seen == THREADS
    assert stats.traced_serialised_waits == 0
    handle.detach()


def test_eight_threads_traced_are_serialised_and_each_gets_its_trace():
    model = tiny_llama()
    bare = [_generate(model, i) for i in range(THREADS)]
    handle, records = _attach(model, TRACE_ALL)
    inside, most, lock = set(), [0], threading.Lock()

    def enter(module, args):
        with lock:
            inside.add(threading.get_ident())
            most[0] = max(most[0], len(inside))

    def leave(module, args, output):
        with lock:
            inside.discard(threading.get_ident())
    hooks = [model.model.layers[0].register_forward_pre_hook(enter),
             model.model.layers[-1].register_forward_hook(leave)]
    with handle.request(tenant="held"):               # holds the model: all 8 must queue
        with torch.no_grad():
            model(_prompt(20))
        runner = threading.Thread(target=_run_threads, args=(lambda i: _generate(model, i),))
        runner.start()
        assert wait_until(lambda: handle._tracker._gate.waiting == THREADS, 30)
    runner.join(60)
    for h in hooks:
        h.remove()
    assert most[0] == 1                               # never two threads inside the layers
    held, rest = records[0], records[1:]
    assert held.tenant == "held" and held.traced
    _assert_records_match(rest, bare, traced=True)
    assert all(r.trace.head_entropy.shape == (3, 4) for r in records)
    assert handle.errors == 0 and handle.stats().traced_serialised_waits >= THREADS
    handle.detach()


# --- run_model_work ----------------------------------------------------------------------

class _Poster:
    """Calls run_model_work(fn) on its own (control) thread; fn records where it ran."""

    def __init__(self, handle, model, handoff_s: float, fail: bool = False):
        self.tracker, self.model, self.fail = handle._tracker, model, fail
        self.ran_on, self.result, self.error = None, None, None
        self.posted_s = self.ran_s = math.nan                     # monotonic
        self.thread = threading.Thread(target=self._post, args=(handoff_s,))
        self.thread.start()

    def fn(self):
        self.ran_on, self.ran_s = threading.get_ident(), time.monotonic()
        with torch.no_grad():
            self.model(token_ids(4))                  # model work: not a request
        if self.fail:
            raise ValueError("trial exploded")
        return "done"

    def _post(self, handoff_s):
        try:
            self.posted_s = time.monotonic()
            self.result = self.tracker.run_model_work(self.fn, handoff_s=handoff_s)
        except Exception as exc:  # noqa: BLE001
            self.error = exc

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self


def test_posted_work_runs_on_the_serving_thread_that_opens_the_next_request():
    model = tiny_llama()
    handle, records = _attach(model, TRACE_NONE)
    poster = _Poster(handle, model, handoff_s=30)
    assert wait_until(lambda: handle.control_waiting, 10)
    _generate(model, 0)                               # this thread opens the next request
    poster.join()
    assert poster.ran_on == threading.get_ident() != poster.thread.ident
    assert poster.result == ("done", WorkSite.SERVING_THREAD) and poster.error is None
    assert len(records) == 1 and records[0].prompt_tokens == 3  # fn's forward: no record
    assert handle.stats().work_on_serving_thread == 1 and not handle.control_waiting
    handle.detach()


def test_serve_pending_runs_posted_work_on_an_idle_serving_loop():
    model = tiny_llama()
    handle, records = _attach(model, TRACE_NONE)
    assert handle.serve_pending(0) == 0               # nothing posted: returns at once
    with pytest.raises(ValueError, match="timeout_s"):
        handle.serve_pending(-0.1)
    poster = _Poster(handle, model, handoff_s=30)
    assert handle.serve_pending(20) == 1
    poster.join()
    assert poster.ran_on == threading.get_ident()
    assert poster.result == ("done", WorkSite.SERVING_THREAD) and records == []
    with handle.request():
        with pytest.raises(RuntimeError, match="inside a request"):
            handle.serve_pending(0)
    handle.detach()


@pytest.mark.parametrize("handoff_s", [0.0, 0.3])
def test_posted_work_falls_back_to_the_control_thread_after_handoff_s(handoff_s):
    model = tiny_llama()
    handle, records = _attach(model, TRACE_NONE)
    poster = _Poster(handle, model, handoff_s=handoff_s).join()
    assert poster.ran_s - poster.posted_s >= handoff_s         # it waited for a serving thread
    assert poster.ran_on == poster.thread.ident
    assert poster.result == ("done", WorkSite.CONTROL_THREAD) and records == []
    assert handle.stats().work_on_control_thread == 1
    with pytest.raises(ValueError, match="handoff_s"):
        handle._tracker.run_model_work(poster.fn, handoff_s=-1)
    handle.detach()


def test_an_exception_in_posted_work_reaches_the_poster_not_the_serving_thread():
    model = tiny_llama()
    handle, records = _attach(model, TRACE_NONE)
    fallback = _Poster(handle, model, handoff_s=0, fail=True).join()        # control thread
    served = _Poster(handle, model, handoff_s=30, fail=True)
    assert handle.serve_pending(20) == 1                                     # no raise here
    poster = _Poster(handle, model, handoff_s=30, fail=True)
    assert wait_until(lambda: handle.control_waiting, 10)
    out = _generate(model, 1)                         # runs fn first; fn's error stays there
    for p in (fallback, served.join(), poster.join()):
        assert isinstance(p.error, ValueError) and "exploded" in str(p.error)
    assert out.shape[1] > 4 and poster.ran_on == threading.get_ident() and len(records) == 1
    assert handle.errors == 0
    handle.detach()


def test_work_called_on_a_serving_thread_runs_inline():
    model = tiny_llama()
    handle, records = _attach(model, TRACE_NONE)
    _generate(model, 0)                               # this thread is now a serving thread
    start_s = time.monotonic()
    ran_on = []
    result = handle._tracker.run_model_work(lambda: ran_on.append(threading.get_ident()) or 7,
                                            handoff_s=30)
    assert result == (7, WorkSite.SERVING_THREAD) and ran_on == [threading.get_ident()]
    assert time.monotonic() - start_s < 30 and len(records) == 1
    with handle.request():
        with torch.no_grad():
            model(token_ids(3))
        with pytest.raises(RuntimeError, match="between requests"):
            handle._tracker.run_model_work(lambda: 1, handoff_s=30)
    handle.detach()
