"""Agent overhead on SmolLM2-135M: decode tokens/s bare vs attached, side by side in one run.

Configurations are interleaved round by round (bare, default sampling, every request traced),
so that machine noise hits all of them alike; the ratio to bare is what to read. With the agent
attached each request is labelled with its prompt's query class (`handle.request`), as a
serving loop that uses per-class plans would do: the labelled path (and its recent-prompt
bookkeeping) is part of what is measured.

    .venv/bin/python bench/overhead.py [--rounds 5] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar import agent  # noqa: E402
from headroom_sidecar.agent.embedded import start_embedded  # noqa: E402
from headroom_sidecar.agent.settings import AgentSettings  # noqa: E402
from workloads.prompts import PROMPTS, chat_ids  # noqa: E402
from workloads.smollm2 import load_smollm2  # noqa: E402


@dataclass
class Config:
    name: str
    sample_rate: float | None   # None: no agent attached


CONFIGS = (Config("bare model", None),
           Config(f"agent, default sampling ({AgentSettings().sample_rate:g})", AgentSettings().sample_rate),
           Config("agent, every request traced", 1.0))


def run_workload(model, inputs, new_tokens: int, handle=None) -> tuple[int, float]:
    """(tokens generated, seconds) for one pass over (ids, query class), greedy, fixed length."""
    tokens, start = 0, time.perf_counter()
    for ids, query_class in inputs:
        with handle.request(query_class=query_class) if handle else contextlib.nullcontext():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start


def measure(model, inputs, cfg: Config, address: str, new_tokens: int) -> float:
    handle = None
    if cfg.sample_rate is not None:
        handle = agent.attach(model, address=address, sample_rate=cfg.sample_rate)
    try:
        tokens, seconds = run_workload(model, inputs, new_tokens, handle)
    finally:
        if handle is not None:
            handle.detach()
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    inputs = [(chat_ids(tok, p.text), p.query_class.value) for p in PROMPTS[: args.prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        cp = start_embedded(f"{tmp}/bench.duckdb")
        try:
            rates = run_rounds(model, inputs, cp.address, args)
        finally:
            cp.stop()
    report(rates, args)


def run_rounds(model, inputs, address: str, args) -> dict[str, list[float]]:
    run_workload(model, inputs[:1], 4)  # warm-up
    rates: dict[str, list[float]] = {c.name: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS))
        for cfg in order:
            rates[cfg.name].append(measure(model, inputs, cfg, address, args.new_tokens))
    return rates


def report(rates: dict[str, list[float]], args) -> None:
    base = statistics.median(rates[CONFIGS[0].name])
    print(f"\nSmolLM2-135M greedy decode, {args.prompts} prompts x {args.new_tokens} tokens, "
          f"{args.rounds} interleaved rounds, torch threads={torch.get_num_threads()}")
    print(f"{'configuration':<40} {'median tok/s':>12} {'ratio':>7} {'slowdown':>9}")
    for cfg in CONFIGS:
        med = statistics.median(rates[cfg.name])
        print(f"{cfg.name:<40} {med:>12.2f} {med / base:>7.3f} {100 * (1 - med / base):>8.1f}%")


if __name__ == "__main__":
    main()
