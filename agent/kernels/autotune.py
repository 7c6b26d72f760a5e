"""Kernels chosen by measurement at apply time (as torchao's autoquant does).

For one weight, each candidate that its probe found safe (agent/kernels/probe.py) is run at
batch 1 (decode) on this machine: its output checked against the reference, then timed with
a monotonic clock (a warm-up call, then rounds of one call per candidate, median; about
TIME_BUDGET_MS in all, at least one round). The fastest correct one wins. The choice and the
timings are kept on the module (`.choice`) and reported per layer in the ApplyReport's
`kernels` (kernel_choices). Timings are what this machine gave at apply time, load from
other processes included: on a busy 2-core box a multithreaded kernel can measure 1000x
slower than idle, which is why the candidates are interleaved.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

Linear = Callable[[torch.Tensor], torch.Tensor]
Check = Callable[[str, torch.Tensor], str]          # (kernel, output) -> "" or what is wrong

TIME_BUDGET_MS = 40.0     # all candidates of one shape together, warm-ups included
MAX_CALLS = 7             # timing rounds (median), fewer when the budget runs out
SLOW_FACTOR = 4.0         # after a round, a candidate this much slower than the best drops out


@dataclass(frozen=True)
class KernelChoice:
    kernel: str
    candidates_us: dict[str, float] = field(default_factory=dict)   # median µs at batch 1
    rejected: dict[str, str] = field(default_factory=dict)          # kernel -> why not

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "candidates_us": dict(self.candidates_us),
                "rejected": dict(self.rejected)}


def fastest(fns: dict[str, Linear], x: torch.Tensor, check: Check,
            budget_ms: float = TIME_BUDGET_MS) -> KernelChoice:
    """Time each of `fns` (the last is the fallback) on x, keep the fastest correct one.
    Falls back to the last candidate when none is correct."""
    live, rejected, warm_s = {}, {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        wrong = checked_call(name, fn, x, check)     # warm-up call (one-time init), checked
        warm_s[name] = time.perf_counter() - t0
        if wrong:
            rejected[name] = wrong
        elif not _hopeless(warm_s[name], [warm_s[n] for n in live], budget_ms / len(fns)):
            live[name] = fn
    if not live:
        return KernelChoice(list(fns)[-1], {}, rejected)
    samples = _round_robin(live, x, budget_ms)
    samples.update({n: [warm_s[n]] for n in fns if n not in live and n not in rejected})
    timings = {name: round(statistics.median(s) * 1e6, 1) for name, s in samples.items()}
    return KernelChoice(min(timings, key=timings.get), timings, rejected)


def reference_check(rows: int, out_features: int, ref: torch.Tensor,
                    bound: Callable[[str], float]) -> Check:
    """(kernel, y [rows, out_features]) -> "" or what is wrong: y's first ref.shape[1] output
    columns against ref [rows, r] (a slice keeps the reference cheap on an lm_head), in
    ref's dtype, within bound(kernel) relative error."""
    r = ref.shape[1]

    def check(kernel: str, y: torch.Tensor) -> str:
        if y.shape != (rows, out_features):
            return f"output shape {tuple(y.shape)}, expected {(rows, out_features)}"
        rel = ((y[:, :r].to(ref.dtype) - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        limit = bound(kernel)
        return "" if rel <= limit else f"relative error {rel:.3g} > {limit:g} vs the reference"
    return check


def _hopeless(warm_s: float, others_warm_s: list[float], share_ms: float) -> bool:
    """A warm-up call longer than its share of the budget and SLOW_FACTOR times slower than
    another candidate's (whose warm-up even includes its one-time init) is not timed again:
    on a lm_head-sized weight one dequant call is ~50 ms."""
    return warm_s * 1e3 > share_ms and any(warm_s > SLOW_FACTOR * o for o in others_warm_s)


def checked_call(name: str, fn: Linear, x: torch.Tensor, check: Check) -> str:
    """"" or what is wrong with fn(x): a wrong output, or the error it raised (a probed
    kernel may still raise here, e.g. out of memory on the real shape: it is then dropped)."""
    try:
        return check(name, fn(x))
    except Exception as e:       # noqa: BLE001  apply must go on with the next candidate
        return f"{type(e).__name__}: {str(e)[:200]}"


def _round_robin(fns: dict[str, Linear], x: torch.Tensor, budget_ms: float) -> dict[str, list]:
    """Seconds per call of each fn, one call each per round, so that load from other
    processes falls on every candidate alike; after round 1 a candidate SLOW_FACTOR times
    slower than the best drops out; rounds stop at MAX_CALLS or when the budget is spent."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_ms / 1e3
    live = dict(fns)
    for _ in range(MAX_CALLS):
        for name, fn in live.items():
            samples[name].append(_timed(fn, x)[0])
        keep = within_slow_factor({n: samples[n][-1] for n in live})
        live = {n: f for n, f in live.items() if n in keep}
        if time.perf_counter() > deadline:
            break
    return samples


def within_slow_factor(latest_s: dict[str, float]) -> set[str]:
    """The candidates at most SLOW_FACTOR times slower than the fastest in this round."""
    best_s = min(latest_s.values())
    return {name for name, t in latest_s.items() if t <= SLOW_FACTOR * best_s}


def _timed(fn: Linear, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(seconds, output) of one call, synchronised on CUDA."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    y = fn(x)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0, y


def kernel_choices(model: nn.Module) -> dict[str, dict]:
    """Module path -> its choice, for every module that made one (JSON-serialisable)."""
    return {name: m.choice.as_dict() for name, m in model.named_modules()
            if isinstance(getattr(m, "choice", None), KernelChoice)}
