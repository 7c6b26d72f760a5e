"""Why a trial must run on the serving thread: the same decode timed on the main thread and on a
second Python thread of the same process, unoptimised and with a plan, interleaved.

On a CPU each Python thread that calls into torch gets its own OpenMP team; the serving
thread's team stays alive (spinning, then sleeping) while another thread's team works, so a
second thread's timings are those of an oversubscribed machine, and a plan made of many small
kernels suffers from that more than the unoptimised model does.

    .venv/bin/python bench/thread_penalty.py [--plan .headroom/best-plan.json] [--rounds 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.latency import generate_timed  # noqa: E402
from bench.agree import smollm2_with_plan  # noqa: E402
from workloads.prompts import PROMPTS, chat_ids  # noqa: E402


def on_thread(fn) -> float:
    """fn() on a fresh Python thread; its result."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), name="second-thread")
    t.start()
    t.join()
    return out[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", default=".headroom/best-plan.json")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    model, tok, ex = smollm2_with_plan(args.plan)
    ids = chat_ids(tok, PROMPTS[0].text)[0]
    timed = lambda: generate_timed(model, ids, args.new_tokens)[1]
    samples = {k: [] for k in ("base main", "base second", "plan main", "plan second")}
    timed(), on_thread(timed)                                   # warm-up, any compile
    for r in range(args.rounds):
        with ex.baseline():
            samples["base main"].append(timed())
            samples["base second"].append(on_thread(timed))
        samples["plan second"].append(on_thread(timed))
        samples["plan main"].append(timed())
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x "
          f"{args.new_tokens} tokens, plan {args.plan}")
    for k, v in med.items():
        print(f"  {k:12s} {v:7.2f} ms/token  (min {min(samples[k]):.2f}, max {max(samples[k]):.2f})")
    print(f"  latency ratio on the main thread   {med['plan main'] / med['base main']:.3f}")
    print(f"  latency ratio on a second thread   {med['plan second'] / med['base second']:.3f}")
    print(f"  second / main thread: unoptimised {med['base second'] / med['base main']:.2f}x, "
          f"plan {med['plan second'] / med['plan main']:.2f}x")


if __name__ == "__main__":
    main()
