"""`make demo`: SmolLM2-135M under headroom, on an embedded control plane, end to end.

1. Observe: attach the agent, serve a mixed workload, print what the control plane learned.
2. Decide and apply: the control plane's planner runs trials on the agent, the policies decide,
   the approved plan is rolled out, then rolled back; the audit chain is verified.
3. A table of unoptimised, static int8, and each approved plan, all measured in this run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from headroom_sidecar import agent
from headroom_sidecar.proto.client import AdminClient, reply_json
from workloads import report
from workloads.prompts import PROMPTS, chat_ids
from workloads.smollm2 import load_smollm2

OPERATOR = "operator:demo"   # the configured identity the demo approves and rolls back as


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--db", default=".headroom/demo.duckdb", help="control plane DuckDB file (recreated)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--max-trials", type=int, default=10)
    p.add_argument("--min-top1", type=float, default=0.97)
    p.add_argument("--max-ppl-ratio", type=float, default=1.01)
    p.add_argument("--observe-only", action="store_true", help="stop after the observation part")
    return p.parse_args()


def serve_workload(handle, model, tok, new_tokens: int) -> None:
    """Every prompt once, labelled with its query class: one request each."""
    print(f"\n== serving {len(PROMPTS)} requests ({new_tokens} new tokens max, greedy) ==")
    for prompt in PROMPTS:
        ids = chat_ids(tok, prompt.text)
        start = time.perf_counter()
        with handle.request(tenant="demo", route="/chat", query_class=prompt.query_class.value):
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
        print(f"  [{prompt.query_class.value:<10}] {1000 * (time.perf_counter() - start):6.0f} ms  "
              f"{prompt.text[:40]:<40} -> {text[:60]}")


def observe(handle, model, tok, args) -> None:
    serve_workload(handle, model, tok, args.new_tokens)
    if not handle.exporter.flush(15_000):
        print("  (warning: not every record was acknowledged; counters below say what was lost)")
    print(f"  export counters: {handle.exporter.counters()}")
    with AdminClient(handle.target, actor=OPERATOR) as admin:
        summary = reply_json(admin.analysis_summary(agent_id=handle.agent_id, limit=5))
    report.print_learned(summary)


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    db = Path(args.db)
    if db.exists():
        db.unlink()
    shutil.rmtree(db.with_suffix(".duckdb.wal"), ignore_errors=True)
    print("loading SmolLM2-135M-Instruct ...")
    model, tok = load_smollm2()
    # The embedded control plane inherits these: a short canary watch for a demo.
    os.environ.setdefault("HEADROOM_ROLLOUT_CANARY_REQUESTS", "4")
    os.environ.setdefault("HEADROOM_ROLLOUT_CANARY_S", "120")
    handle = agent.attach(model, tokenizer=tok, sample_rate=1.0, embedded_db_path=str(db),
                          guard_every_n_requests=2)
    print(f"agent {handle.agent_id} attached; control plane at {handle.target}; "
          f"GPU: {handle.gpu_status}")
    try:
        observe(handle, model, tok, args)
        if not args.observe_only:
            from workloads.demo_loop import run_loop
            run_loop(handle, model, tok, args, OPERATOR)
    finally:
        handle.detach()
    print(f"\ncontrol plane data kept in {db}; query it with "
          f".venv/bin/headroom-controlplane query \"SELECT ...\" --db {db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
