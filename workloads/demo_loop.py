"""The demo's second half: the control plane plans, decides and rolls out; then a rollback.

Every figure printed is measured in this run: trials report the agent's own side-by-side
measurements (unoptimised and with the plan, same prompts, same held-out text). The one
exception is the unoptimised row's quality columns, the reference itself (top-1 1, KL 0,
perplexity ratio 1, exact match 1 by definition).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from headroom_sidecar.proto.client import AdminClient, reply_json
from headroom_sidecar.controlplane.evalsets import EvalSettings, eval_spec
from workloads import report
from workloads.prompts import PROMPTS, chat_ids

# Held-out evaluation sent with every trial: 16 x 128 teacher-forced tokens (the default
# policy asks for at least 2048), 2 prompts greedily continued for exact match and latency.
EVAL = {"seq_len": 129, "max_sequences": 16, "prompts": 2, "prompt_tokens": 16,
        "new_tokens": 12, "latency_repeats": 3}
POLL_S = 2.0
OBJECTIVES = {"latency": "the fastest plan inside the quality budget, never slower than "
                         "unoptimised; memory breaks near-ties",
              "memory": "a policy states the memory trade for this route: the smallest plan "
                        "inside its latency bound"}
BEST_PLAN_PATH = Path(".headroom/best-plan.json")   # read by `make bench-table`
BEST_EVIDENCE_PATH = Path(".headroom/best-plan-evidence.json")   # read by bench/agree.py


def static_int8_plan(handle) -> dict:
    """What a user would do today without headroom: int8 weights everywhere."""
    layers = {str(i): "int8" for i in range(handle.structure.num_layers)}
    return {"schema": "headroom.plan/v1", "plan_id": "static-int8", "version": 1,
            "model_fingerprint": handle.model_info.fingerprint, "query_classes": [],
            "mode": "structural", "notes": "static int8 baseline",
            "transforms": [{"kind": "weight_precision", "layers": layers}]}


def wait_job(admin: AdminClient, job_id: str, handle, serve=None, timeout_s: float = 1800) -> dict:
    """Polls a control-plane job; `serve()` runs between polls while rolling out (requests the
    canary watches); otherwise this serving thread waits in handle.serve_pending(), so trials
    run here, on the thread that serves requests, as they would between a server's requests."""
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        job = reply_json(admin.get_job(job_id))
        progress = (job["stage"], job["trials"], job["state"])
        if progress != seen:
            print(f"  job {job_id}: stage={job['stage']} trials={job['trials']} state={job['state']}")
            seen = progress
        if job["state"] != "running":
            return job
        if serve is not None and job["stage"] == "rolling_out":
            serve()
        else:
            handle.serve_pending(POLL_S)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")


def greedy_probe(model, tok) -> torch.Tensor:
    ids = chat_ids(tok, PROMPTS[0].text)
    return model.generate(ids, max_new_tokens=16, do_sample=False)


def serve_some(handle, model, tok, n: int = 2) -> None:
    for prompt in PROMPTS[:n]:
        with handle.request(tenant="demo", route="/chat", query_class=prompt.query_class.value):
            model.generate(chat_ids(tok, prompt.text), max_new_tokens=12, do_sample=False)


def run_loop(handle, model, tok, args, operator: str) -> None:
    before = greedy_probe(model, tok)
    print("\n== static int8 baseline (trial on the agent, same held-out eval) ==")
    rows = []
    # The same eval_json document the control plane sends with its trials.
    int8 = handle.run_trial(static_int8_plan(handle), eval_spec(EvalSettings.resolve(), EVAL))
    rows.append(("unoptimised", _base_side(int8)))
    rows.append(("static int8 (all layers)", _plan_side(int8)))
    with AdminClient(handle.target, actor=operator, timeout_s=120) as admin:
        job = _plan(admin, handle, model, tok, args)
        best = job.get("plan_id")
        if best:
            rows += _decide_and_apply(admin, handle, model, tok, job)
            _rollback(admin, handle, model, tok, best, before)
        _print_decisions(admin)
        verdict = reply_json(admin.verify_audit())
        print(f"\naudit chain: {'verified' if verdict['ok'] else 'BROKEN'} "
              f"({verdict['rows_checked']} rows)" + ("" if verdict["ok"] else f": {verdict['reason']}"))
    _print_table(rows)


def _plan(admin: AdminClient, handle, model, tok, args) -> dict:
    print(f"\n== planning: up to {args.max_trials} trials, budget top-1 >= {args.min_top1}, "
          f"perplexity ratio <= {args.max_ppl_ratio} ==")
    job = admin.trigger_plan(
        agent_id=handle.agent_id, max_trials=args.max_trials, eval=EVAL,
        budget={"min_top1": args.min_top1, "max_ppl_ratio": args.max_ppl_ratio},
        tenant="demo", route="/chat")
    job = wait_job(admin, job.job_id, handle, serve=lambda: serve_some(handle, model, tok))
    print(f"  objective: {job.get('objective')} ({OBJECTIVES.get(job.get('objective'), '')}); "
          f"{job['message']}")
    return job


def _decide_and_apply(admin: AdminClient, handle, model, tok, job: dict) -> list:
    plan_id = job["plan_id"]
    shown = reply_json(admin.show_plan(plan_id))
    print(f"\nbest plan {plan_id}: decision {job['decision']}")
    BEST_PLAN_PATH.parent.mkdir(parents=True, exist_ok=True)
    BEST_PLAN_PATH.write_text(json.dumps(shown["doc"], indent=1, sort_keys=True) + "\n")
    print(f"  plan document: {BEST_PLAN_PATH} (bench/table.py --plan reads it)")
    for line in shown["diff"]:
        print(f"  {line}")
    if job["decision"] == "needs_human":
        print(f"  needs a human: {operator_reason(shown)}; approving as {admin.actor}")
        rollout = admin.approve_plan(plan_id, "demo: evidence reviewed within budget")
        job = wait_job(admin, rollout.job_id, handle, serve=lambda: serve_some(handle, model, tok))
    status = admin.show_plan(plan_id).plan.status
    print(f"  rollout: {job['message']} -> plan status {status}; agent active plan: "
          f"{handle.active_plan.plan_id if handle.active_plan else None}")
    evidence = _best_evidence(shown)
    if evidence:
        BEST_EVIDENCE_PATH.write_text(json.dumps(evidence, indent=1, sort_keys=True) + "\n")
    return [(f"headroom plan {plan_id}", _plan_side(evidence))] if evidence else []


def operator_reason(shown: dict) -> str:
    decisions = shown.get("decisions") or []
    return decisions[-1]["reason"] if decisions else "(no reason recorded)"


def _rollback(admin: AdminClient, handle, model, tok, plan_id: str, before: torch.Tensor) -> None:
    if handle.active_plan is None:
        return
    applied = greedy_probe(model, tok)
    print(f"\n== rollback of {plan_id} by {admin.actor} ==")
    result = reply_json(admin.rollback_plan(plan_id, "demo: end of the run"))
    print(f"  {result.get('message', result)}")
    after = greedy_probe(model, tok)
    print(f"  greedy output with the plan {'equals' if torch.equal(applied, before) else 'differs from'}"
          f" the unoptimised one; after rollback it is "
          f"{'bitwise identical' if torch.equal(after, before) else 'DIFFERENT'}")


def _best_evidence(shown: dict) -> Any:
    trials = [t for t in shown.get("trials", []) if t.get("evidence")]
    return trials[-1]["evidence"] if trials else None


def _get(ev):
    return (lambda k: ev[k]) if isinstance(ev, dict) else (lambda k: getattr(ev, k))


def _base_side(ev) -> dict:
    get = _get(ev)
    return {"latency": get("latency_ms_per_token_base"), "bytes": get("weight_bytes_base"),
            "top1": 1.0, "kl": 0.0, "ppl": 1.0, "em": 1.0, "ratio": None,
            "base_bytes": get("weight_bytes_base")}


def _plan_side(ev) -> dict:
    get = _get(ev)
    return {"latency": get("latency_ms_per_token_plan"), "bytes": get("weight_bytes_plan"),
            "top1": get("top1_agreement"), "kl": get("mean_kl"), "ppl": get("ppl_ratio"),
            "em": get("exact_match"), "base_bytes": get("weight_bytes_base"),
            "ratio": (get("latency_ratio"), get("latency_ratio_min"), get("latency_ratio_max"),
                      get("latency_pairs"))}


def _print_decisions(admin: AdminClient) -> None:
    plans = reply_json(admin.list_plans(limit=100))
    print("\n== every hypothesis the planner tried, and what became of it ==")
    print(report.table(["plan", "status", "notes"],
                       [[p["plan_id"], p["status"], p["notes"][:70]] for p in reversed(plans)]))
    for p in plans:
        if p["status"] in ("applied", "approved", "needs_human", "rolled_back", "rejected") \
                and p["plan_id"] != "static-int8":
            shown = reply_json(admin.show_plan(p["plan_id"]))
            for d in shown.get("decisions", []):
                _print_rules(p["plan_id"], d)


def _print_rules(plan_id: str, decision: dict) -> None:
    rules = decision.get("rules") or []
    if not rules:
        print(f"\n{plan_id}: {decision['outcome']} by {decision['actor']}: {decision['reason']}")
        return
    print(f"\n{plan_id}: {decision['outcome']} under policy revision {decision['policy_revision']}")
    print(report.table(["rule", "where", "measured", "threshold", "outcome"],
                       [[r["rule_id"], f"{Path(r['file']).name}:{r['line']}", _short(r["measured"]),
                         _short(r["threshold"]), r["outcome"]]
                        for r in rules if r["outcome"] != "not_applicable"]))


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_short(x)}" for k, x in v.items())
    if isinstance(v, list):
        return f"{len(v)} items" if len(v) > 3 else ", ".join(map(str, v))
    return "" if v is None else str(v)


def _print_table(rows: list) -> None:
    print("\n== unoptimised vs static int8 vs headroom, measured in this run (decode, batch 1) ==")
    print("   latency ratio: plan / unoptimised, median of back-to-back pairs timed in the row's own")
    print("   trial on the serving thread (min-max over the pairs, n pairs); memory vs unoptimised")
    out = []
    for name, s in rows:
        out.append([name, s["latency"], _ratio_cell(s["ratio"]),
                    s["bytes"] / 2**20, f"{100 * (1 - s['bytes'] / s['base_bytes']):.1f}%",
                    s["top1"], s["kl"], s["ppl"], s["em"]])
    print(report.table(["configuration", "ms/token", "latency ratio", "weight MiB", "memory cut",
                        "top-1", "mean KL", "ppl ratio", "exact match"], out))


def _ratio_cell(ratio) -> str:
    if ratio is None:
        return "1 (the reference)"
    median, lo, hi, n = ratio
    return f"{median:.3f} ({lo:.2f}-{hi:.2f}, n={n})"
