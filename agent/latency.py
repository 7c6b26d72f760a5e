"""Decode latency of a plan against the unoptimised model, timed the way serving runs it.

Why interleaved: on a shared machine the speed of both sides drifts with whatever else runs
(other processes, the other core, thermal state), and a plan's kernels can react to that
drift differently from the unoptimised model's. Timing the two sides in separate windows (the
baseline once per job, the plan minutes later) measures the drift, not the plan. So every
sample is a *pair*: one greedy generate() without the plan and one with it, back to back on
the same prompt, order alternating (ABBA) so neither side always runs second. The ratio of
each pair is a sample of the speed-up; the evidence carries the median and the spread.

Why on the caller's thread and state: on a CPU, torch work on another Python thread runs its
own OpenMP team, which competes with the serving thread's team. The caller (agent/control.py)
runs this on a thread that serves requests, with the plan applied as serving would run it
(the same compiled state: `Executor.baseline()` swaps the original modules in for the A side
and puts the plan's own modules, compiled caches included, back for the B side).

Warm-up is excluded from the steady-state figures and reported on its own: the first generate
of each side (which pays for any compile and for cold caches) is timed whole.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from headroom_sidecar.agent.executor import Executor


@dataclass(frozen=True)
class Spread:
    """min / median / max of a list of samples, and how many there were."""
    n: int
    min: float
    median: float
    max: float

    @staticmethod
    def of(samples: Sequence[float]) -> "Spread":
        if not samples:
            nan = float("nan")
            return Spread(0, nan, nan, nan)
        return Spread(len(samples), min(samples), statistics.median(samples), max(samples))


@dataclass(frozen=True)
class LatencyResult:
    base_ms: Spread          # decode ms per token without the plan, one sample per generate
    plan_ms: Spread          # the same with the plan
    ratio: Spread            # plan / base, one sample per back-to-back pair
    warmup_base_ms: float    # first generate without the plan, whole (excluded above)
    warmup_plan_ms: float    # first generate with the plan, whole: includes any compile
    thread: str              # the thread that timed it


class FirstToken:
    """A logits processor that notes when the first new token's logits are ready (the end of
    prefill); generate() calls it once a step, only the first call is kept."""

    def __init__(self, device: torch.device):
        self.device, self.at_ns = device, 0

    def __call__(self, input_ids, scores):
        if not self.at_ns:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at_ns = time.perf_counter_ns()
        return scores


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_timed(model: nn.Module, prompt: torch.Tensor, new_tokens: int
                   ) -> tuple[torch.Tensor, float]:
    """Greedy continuation [new_tokens] of prompt [Tp], and its decode ms per token: from the
    first token's logits to the end, over the new_tokens - 1 tokens decoded after it. A whole
    span, not a median of step gaps: speculative decoding emits several tokens per forward."""
    dev = model_device(model)
    first = FirstToken(dev)
    ids = prompt.unsqueeze(0).to(dev)                                     # [1, Tp]
    t0_ns = time.perf_counter_ns()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, logits_processor=[first],
                         pad_token_id=0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    end_ns = time.perf_counter_ns()
    # A generate loop that never calls logits processors: the span then includes the prefill.
    start_ns = first.at_ns or t0_ns
    per_token = (end_ns - start_ns) / 1e6 / (new_tokens - 1) if new_tokens > 1 else float("nan")
    return out[0, ids.shape[1]:].cpu(), per_token


def _per_token_ms(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    return generate_timed(model, prompt, new_tokens)[1]


def _whole_ms(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter_ns()
    generate_timed(model, prompt, new_tokens)
    return (time.perf_counter_ns() - t0) / 1e6


def interleaved(model: nn.Module, executor: Executor, prompts: Sequence[torch.Tensor],
                new_tokens: int, rounds: int) -> LatencyResult:
    """Times the active plan against the unoptimised model: `rounds` x len(prompts) pairs.
    The plan must be applied (executor.active_plan set) and stays applied."""
    if executor.active_plan is None:
        raise RuntimeError("interleaved timing needs the plan applied")
    if not prompts or new_tokens < 2:
        raise ValueError("latency needs at least one prompt and 2 new tokens (one decode gap)")
    with executor.baseline():
        warm_base = _whole_ms(model, prompts[0], new_tokens)
    warm_plan = _whole_ms(model, prompts[0], new_tokens)
    base, plan, ratio = [], [], []
    for r in range(rounds):
        for i, p in enumerate(prompts):
            b, a = _pair(model, executor, p, new_tokens, plan_first=(r + i) % 2 == 1)
            base.append(b)
            plan.append(a)
            ratio.append(a / b)
    return LatencyResult(Spread.of(base), Spread.of(plan), Spread.of(ratio), warm_base, warm_plan,
                         threading.current_thread().name)


def _pair(model: nn.Module, executor: Executor, prompt: torch.Tensor, new_tokens: int,
          plan_first: bool) -> tuple[float, float]:
    """(base ms/token, plan ms/token), measured back to back."""
    if plan_first:
        plan = _per_token_ms(model, prompt, new_tokens)
    with executor.baseline():
        base = _per_token_ms(model, prompt, new_tokens)
    if not plan_first:
        plan = _per_token_ms(model, prompt, new_tokens)
    return base, plan
