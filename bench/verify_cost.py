"""What a speculative verify forward costs against a decode step, on SmolLM2-135M (CPU):
one forward of q new tokens over a 120-token KV cache, q = 1 (a decode step) and the verify
sizes of drafts of 3, 6 and 12 tokens, unoptimised and under fp32_packed (every block and the
lm_head). Rounds interleave the two models; each figure is the median over rounds of the
median of `--calls` calls; the ratio column is q's time over q=1's of the same model.

    .venv/bin/python bench/verify_cost.py [--rounds 3] [--calls 8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.adapters import resolve_structure  # noqa: E402
from headroom_sidecar.agent.executor import Executor  # noqa: E402
from headroom_sidecar.agent.executor.speculative.model_io import forward_logits, new_cache  # noqa: E402
from headroom_sidecar.agent.fingerprint import fingerprint  # noqa: E402
from headroom_sidecar.proto.plan import Plan  # noqa: E402
from bench.table import fp32_packed_everywhere  # noqa: E402
from workloads.smollm2 import load_smollm2  # noqa: E402

ROWS = (1, 4, 7, 13)          # a decode step; k = 3, 6, 12 drafted tokens + the verifier's own
PREFIX_TOKENS = 120


def forward_ms(model, prefix: torch.Tensor, q: int, calls: int) -> float:
    """Median ms of one forward of q tokens appended to a cache of the prefix (cropped back)."""
    cache = new_cache(model)
    forward_logits(model, prefix, cache, 1)
    x = torch.randint(100, 20000, (1, q), generator=torch.Generator().manual_seed(q))
    times = []
    for _ in range(calls + 1):
        t0 = time.perf_counter()
        forward_logits(model, x, cache, q)                                   # [q, V]
        times.append(time.perf_counter() - t0)
        cache.crop(-q)                                                       # back to the prefix
    return statistics.median(times[1:]) * 1e3                               # first: warm-up


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, _tok = load_smollm2()
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    ex = Executor(model, s, fp)
    plan = Plan.from_doc(fp32_packed_everywhere(fp, s))
    prefix = torch.randint(100, 20000, (1, PREFIX_TOKENS), generator=torch.Generator().manual_seed(0))
    ms: dict[str, dict[int, list[float]]] = {"unoptimised": {}, "fp32_packed": {}}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in ms:
                if name == "fp32_packed":
                    ex.apply(plan)
                for q in ROWS:
                    ms[name].setdefault(q, []).append(forward_ms(model, prefix, q, args.calls))
                if name == "fp32_packed":
                    ex.rollback()
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, {args.rounds} rounds x "
          f"{args.calls} calls, cache of {PREFIX_TOKENS} tokens")
    print(f"{'model':12} " + " ".join(f"{f'q={q} ms (x q=1)':>18}" for q in ROWS))
    for name, by_q in ms.items():
        one = statistics.median(by_q[1])
        cells = [f"{statistics.median(v):8.1f} ({statistics.median(v) / one:4.2f}x)" for v in by_q.values()]
        print(f"{name:12} " + " ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
