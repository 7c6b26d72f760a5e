"""A planning job for one query class: speculation only, on top of the agent's default plan.

The control loop (controlplane/loop.py) runs this instead of the weight search when a trigger
names a query class: weights are process-wide on the agent, so a class can only choose how it
speculates (planner/speculation.py). The pieces read from the store:
- the base: the default plan (no query classes) most recently applied on the agent and not
  rolled back since; none: the unoptimised model;
- the draft plan for "self" drafting: the fastest trialled default plan of this model (by its
  trial's latency ratio, below 1) other than the base, its transforms of the draft kinds only;
  a plan the policy refused for quality is a fine draft, since the verifier keeps the output.
Trials use the job's eval set, whose prompts the agent replaces with the class's recent
prompts (eval_json traffic_prompts; loop.py asks for CLASS_TRAFFIC_PROMPTS unless the trigger's
eval arguments set it).
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

from headroom_sidecar.controlplane.planner.speculation import SpeculationResult, SpeculationSearch
from headroom_sidecar.proto.plandoc import DRAFT_PLAN_KINDS, PLAN_SCHEMA

_LATEST_DEFAULT_SQL = """
SELECT a.state, p.doc_json FROM applications a JOIN plans p USING (plan_id)
WHERE a.agent_id = ? AND len(p.query_classes) = 0 AND a.state <> 'requested'
ORDER BY a.ts_us DESC LIMIT 1"""

_TRIALLED_DEFAULTS_SQL = """
SELECT p.plan_id, p.doc_json, t.evidence_json FROM trials t JOIN plans p USING (plan_id)
WHERE p.fingerprint = ? AND len(p.query_classes) = 0 AND t.evidence_json IS NOT NULL
ORDER BY t.requested_at_us"""

_DRAFT_KINDS = {k.value for k in DRAFT_PLAN_KINDS}


def base_doc(cur, agent_id: str, fingerprint: str) -> dict:
    """The agent's default plan document, or a bare one (the unoptimised model)."""
    row = cur.execute(_LATEST_DEFAULT_SQL, [agent_id]).fetchone()
    if row is not None and row[0] == "applied":
        return json.loads(row[1])
    return {"schema": PLAN_SCHEMA, "plan_id": "unoptimised", "version": 1,
            "model_fingerprint": fingerprint, "query_classes": [], "mode": "structural",
            "transforms": [], "notes": ""}


def draft_plan(cur, fingerprint: str, base_plan_id: str) -> Optional[list[dict]]:
    best, best_ratio = None, 1.0
    for plan_id, doc_json, evidence_json in cur.execute(_TRIALLED_DEFAULTS_SQL, [fingerprint]).fetchall():
        ratio = _ratio(evidence_json)
        draft = [t for t in json.loads(doc_json)["transforms"] if t.get("kind") in _DRAFT_KINDS]
        if plan_id != base_plan_id and draft and ratio < best_ratio:
            best, best_ratio = draft, ratio
    return best


def _ratio(evidence_json: str) -> float:
    try:
        value = float(json.loads(evidence_json).get("latency_ratio"))
    except (TypeError, ValueError, AttributeError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def search_class(loop: Any, job: Any, request: Any, spec: str, actor: str) -> SpeculationResult:
    """Runs the candidates' trials on the job's agent (recorded in the plan store and audit)."""
    from headroom_sidecar.controlplane.planner.recorder import StoreRecorder
    recorder = StoreRecorder(loop.plans, loop.audit, job.agent_id, actor=actor)

    def evaluate(doc: dict) -> dict:
        loop._update(job, trials=job.trials + 1)
        return loop.client.request(job.agent_id, doc, spec, loop.settings.trial_timeout_s)

    with loop.store.reader() as cur:
        base = base_doc(cur, job.agent_id, job.fingerprint)
        draft = draft_plan(cur, job.fingerprint, base["plan_id"])
    _, budget = loop._objective(request)
    search = SpeculationSearch(evaluate, budget.max_latency_ratio, request.max_trials,
                               record=recorder.record, propose=recorder.propose)
    return search.run(base, request.query_class, job.job_id, draft)
