"""The probe child (started by agent.kernels.probe): reads a job from stdin, runs each case.

Protocol on stdout, one flushed line each: `HEADROOM-PROBE {"begin": key}` before a case and
`HEADROOM-PROBE {"key": key, "safe": bool, "reason": str}` after it. A case that kills the
process leaves its BEGIN without a verdict; see probe.run_children.
"""
from __future__ import annotations

import importlib
import json
import sys

import torch

from headroom_sidecar.agent.kernels.probe import _LINE, PROBE_ROWS, ProbeCase
from headroom_sidecar.agent.kernels.reference import int8_linear_ref


def main() -> int:
    _no_core_dumps()
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(int(job["threads"]))     # the parent's: threaded paths differ
    for raw in job["cases"]:
        case = ProbeCase(**raw)
        _emit({"begin": case.key})
        safe, reason = run_case(case)
        _emit({"key": case.key, "safe": safe, "reason": reason})
    return 0


def run_case(case: ProbeCase) -> tuple[bool, str]:
    """(safe, why not): the kernel on the class's representative shape, each of PROBE_ROWS."""
    try:
        runner = importlib.import_module(case.runner)
        dtype, device = getattr(torch, case.dtype), torch.device(case.device)
        n, k = case.shape()
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(device)
        scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(device, dtype)
        bias = torch.randn(n, generator=g).to(device, dtype)
        fn = runner.prepare(case.kernel, q, scale, bias)
        bound = runner.rel_error_bound(case.kernel, dtype)
        for rows in getattr(runner, "probe_rows", lambda kernel: PROBE_ROWS)(case.kernel):
            x = torch.randn(rows, k, generator=g).to(device, dtype)          # [M, K]
            wrong = _compare(fn(x), int8_linear_ref(x.float(), q, scale.float(), bias.float()),
                             bound)
            if wrong:
                return False, f"wrong result at {rows} rows, shape {n}x{k}: {wrong}"
    except Exception as e:       # noqa: BLE001  any Python error: unsafe, with its message
        return False, f"{type(e).__name__}: {str(e)[:200]}"
    return True, ""


def _compare(y: torch.Tensor, ref: torch.Tensor, bound: float) -> str:
    if y.shape != ref.shape:
        return f"output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    rel = ((y.float().cpu() - ref.cpu()).norm() / ref.norm().clamp_min(1e-30)).item()
    return "" if rel <= bound else f"relative error {rel:.3g} > {bound:g}"


def _emit(msg: dict) -> None:
    sys.stdout.write(_LINE + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _no_core_dumps() -> None:
    """An expected crash should not write a core file (slow, and litters the disk)."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
