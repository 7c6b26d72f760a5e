"""Does the loop's latency figure hold outside the loop? Three timings of one plan, one machine.

1. the trial's: the approved plan's evidence as `make demo` recorded it
   (.headroom/best-plan-evidence.json: median of back-to-back pairs, serving thread);
2. the trial's method again, here: agent.latency.interleaved on a fresh process's model;
3. an independent one: no logits processor and no code of agent/latency.py: per side, whole
   generate() wall time of new_tokens minus that of one token (the prefill and the first
   token), over new_tokens - 1; sides alternating, ratio of the medians.

    .venv/bin/python bench/agree.py [--plan .headroom/best-plan.json] [--rounds 6]

Prints the three ratios and whether they agree within --tolerance (10%). bench/table.py's row
"headroom: plan (as the loop found it)" is the fourth figure (`make bench-table`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.adapters import resolve_structure  # noqa: E402
from headroom_sidecar.agent.executor import Executor, ExecutorSettings  # noqa: E402
from headroom_sidecar.agent.fingerprint import fingerprint  # noqa: E402
from headroom_sidecar.agent.latency import interleaved  # noqa: E402
from headroom_sidecar.proto.plan import Plan  # noqa: E402
from workloads.prompts import PROMPTS, chat_ids  # noqa: E402
from workloads.smollm2 import load_smollm2  # noqa: E402


@torch.no_grad()
def _wall_ms(model, ids: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter_ns()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return (time.perf_counter_ns() - t0) / 1e6


def _decode_ms(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Decode ms per token from wall clocks only: (time of N tokens - time of 1) / (N - 1)."""
    return (_wall_ms(model, ids, new_tokens) - _wall_ms(model, ids, 1)) / (new_tokens - 1)


def wall_ratio(model, ex: Executor, prompts: list[torch.Tensor], new_tokens: int,
               rounds: int) -> tuple[float, float, float]:
    """(median plan ms/token, median unoptimised ms/token, their ratio)."""
    base, plan = [], []
    for r in range(rounds):
        for i, ids in enumerate(prompts):
            with ex.baseline():
                b = _decode_ms(model, ids, new_tokens)
            a = _decode_ms(model, ids, new_tokens)
            base.append(b), plan.append(a)
    mb, mp = statistics.median(base), statistics.median(plan)
    return mp, mb, mp / mb


def smollm2_with_plan(plan_path: str):
    """(model, tokenizer, executor): SmolLM2 with the plan document at plan_path applied by the
    Executor, as an agent would apply it (the document's fingerprint replaced by this model's)."""
    model, tok = load_smollm2()
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    doc = {**json.loads(Path(plan_path).read_text()), "model_fingerprint": fp}
    ex = Executor(model, s, fp, ExecutorSettings(park_device="cpu"))
    print(f"plan {doc['plan_id']}: {ex.apply(Plan.from_doc(doc)).notes or 'applied'}")
    return model, tok, ex


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", default=".headroom/best-plan.json")
    p.add_argument("--evidence", default=".headroom/best-plan-evidence.json")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--tolerance", type=float, default=0.10)
    args = p.parse_args(argv)
    model, tok, ex = smollm2_with_plan(args.plan)
    prompts = [chat_ids(tok, q.text) for q in PROMPTS[:2]]
    for ids in prompts:                                     # warm-up (and any compile)
        _wall_ms(model, ids, args.new_tokens)
    lat = interleaved(model, ex, [i[0] for i in prompts], args.new_tokens, args.rounds)
    wp, wb, wall = wall_ratio(model, ex, prompts, args.new_tokens, args.rounds)
    figures = {"trial method, here": lat.ratio.median, "wall clocks only, here": wall}
    path = Path(args.evidence)
    if path.exists():
        figures = {"make demo's trial": json.loads(path.read_text())["latency_ratio"], **figures}
    for name, v in figures.items():
        print(f"  {name:26s} latency ratio {v:.3f}")
    print(f"  (trial method: {lat.ratio.n} pairs, {lat.ratio.min:.3f}-{lat.ratio.max:.3f}; "
          f"wall clocks only: {wp:.1f} vs {wb:.1f} ms/token)")
    lo, hi = min(figures.values()), max(figures.values())
    ok = hi / lo - 1 <= args.tolerance
    print(f"spread {hi / lo - 1:.1%}: {'agree' if ok else 'DISAGREE'} within {args.tolerance:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
