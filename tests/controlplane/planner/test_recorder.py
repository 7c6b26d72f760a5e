"""End to end without the network: traces in DuckDB -> candidates -> search -> plan store + audit."""
import math
import threading

import pytest

from headroom_sidecar.controlplane.audit import AuditLog
from headroom_sidecar.controlplane.plans import PlanStore
from headroom_sidecar.proto.contract import AuditKind, PlanStatus
from headroom_sidecar.proto.plan import Plan, TransformKind
from headroom_sidecar.proto.plan_fit import check_fits
from headroom_sidecar.controlplane.planner.candidates import CandidateScope, load_candidates
from headroom_sidecar.controlplane.admin_replies import jsonable
from headroom_sidecar.controlplane.planner.recorder import StoreRecorder
from headroom_sidecar.controlplane.planner.search import Planner, PlanTarget, QualityBudget
from headroom_sidecar.controlplane.planner.settings import PlannerSettings
from tests.controlplane.planner.test_candidates import make_traces

FP = "1e" * 32


def evaluate(doc: dict) -> dict:
    """Loss grows with each change's size; a NaN ppl on layer skipping (a broken trial)."""
    plan = Plan.from_doc(doc)
    loss = 0.0
    for t in plan.transforms:
        if t.kind == TransformKind.WEIGHT_PRECISION:
            loss += 0.001 * len(t.layers)
        elif t.kind == TransformKind.ACTIVATION_SPARSITY:
            loss += sum(0.05 * th for th in t.thresholds.values())
        elif t.kind == TransformKind.PRUNE_HEADS:
            loss += 0.004 * sum(len(h) for h in t.heads.values())
        elif t.kind == TransformKind.SKIP_LAYERS:
            return {"top1_agreement": 0.99, "ppl_ratio": math.nan, "mean_kl": 0.001}
    # Every change makes the plan faster: the largest plan that fits is the fastest.
    return {"top1_agreement": 1 - loss, "ppl_ratio": 1 + loss / 4, "mean_kl": loss / 4,
            "latency_ratio": 1 / (1 + loss)}


@pytest.fixture
def db(tmp_path):
    con = make_traces(tmp_path / "cp.duckdb")
    yield con
    con.close()


def test_search_trail_lands_in_store_and_audit(db):
    lock = threading.Lock()
    plans, audit = PlanStore(db, lock), AuditLog(db, lock)
    settings = PlannerSettings(max_trials=30)
    cands = load_candidates(db, CandidateScope(query_class="code"), settings)
    rec = StoreRecorder(plans, audit, agent_id="a1")
    result = Planner(evaluate, QualityBudget(min_top1=0.98), settings=settings,
                     propose=rec.propose, record=rec.record).run(
        PlanTarget(FP, "code-run1", ("code",)), cands)
    rec.settle(result.best["plan_id"])

    n = len(result.trail)
    assert n > 5 and audit.verify().ok
    assert len(audit.rows(kind=AuditKind.PROPOSED, limit=100)) == n
    assert len(audit.rows(kind=AuditKind.TRIAL_RESULT, limit=100)) == n
    dropped = [r for r in result.trail if not r.kept]
    assert len(audit.rows(kind=AuditKind.REJECTED, limit=100)) == len(dropped) > 0
    # the best plan is the only one still trialled; earlier kept plans were superseded
    best_id = result.best["plan_id"]
    assert [p.plan_id for p in plans.list(status=PlanStatus.TRIALLED)] == [best_id]
    kept_ids = [r.plan["plan_id"] for r in result.trail if r.kept]
    assert {p.plan_id for p in plans.list(status=PlanStatus.SUPERSEDED, limit=100)} == set(kept_ids[:-1])
    h = plans.history(best_id)
    assert [t.to_status for t in h.transitions] == [PlanStatus.PROPOSED, PlanStatus.TRIALLED]
    assert h.trials[0].evidence == result.best_trial.evidence and h.trials[0].agent_id == "a1"
    assert h.plan.sha256 == Plan.from_doc(result.best).sha256
    check_fits(Plan.from_doc(result.best), {"num_layers": 4, "num_heads": 3})
    # the NaN evidence of a skip trial is stored as strict JSON
    skip = next(r for r in result.trail if r.phase.value == "skip_layers")
    assert plans.trials(skip.plan["plan_id"])[0].evidence["ppl_ratio"] is None
    assert "evidence has no finite ppl_ratio" in skip.reason


def test_jsonable_makes_non_finite_numbers_none():
    assert jsonable({"a": [1.0, math.inf], "b": {"c": math.nan}}) == {"a": [1.0, None], "b": {"c": None}}


def test_agent_parses_every_hypothesis_and_hashes_the_same(db):
    # tests may import agent/: the two sides must agree on the document and its hash
    from headroom_sidecar.proto.plandoc import plan_hash as agent_hash
    lock = threading.Lock()
    plans = PlanStore(db, lock)
    settings = PlannerSettings(max_trials=30)
    cands = load_candidates(db, CandidateScope(), settings)
    result = Planner(evaluate, QualityBudget(min_top1=0.98), settings=settings).run(
        PlanTarget(FP, "x", ("code", "chat")), cands)
    for r in result.trail:
        stored = plans.add(r.plan, "planner")
        agent_plan = Plan.from_doc(stored.doc)
        assert agent_plan.hash == agent_hash(r.plan) == stored.sha256
        assert agent_plan.plan_id == r.plan["plan_id"]


def test_an_earlier_kept_plan_chosen_as_best_stays_approvable(db):
    """The objective picks among every kept plan: when a later kept change runs slower, the
    best is an earlier one, and only the others are superseded (a superseded best could not
    be approved: the demo's job failed so before settle())."""
    lock = threading.Lock()
    plans, audit = PlanStore(db, lock), AuditLog(db, lock)
    settings = PlannerSettings(max_trials=4, fp32_packed=False, compiled_decode=False)
    cands = load_candidates(db, CandidateScope(query_class="code"), settings)
    rec = StoreRecorder(plans, audit, agent_id="a1")

    def slower_later(doc: dict) -> dict:
        n = int(doc["plan_id"].rsplit("-t", 1)[1])
        return {**evaluate(doc), "latency_ratio": 0.5 + 0.1 * n}     # each trial slower
    result = Planner(slower_later, QualityBudget(min_top1=0.9), settings=settings,
                     propose=rec.propose, record=rec.record).run(PlanTarget(FP, "run2"), cands)
    kept = [r.plan["plan_id"] for r in result.trail if r.kept]
    assert len(kept) >= 2 and result.best["plan_id"] == kept[0]
    assert {p.plan_id for p in plans.list(status=PlanStatus.TRIALLED)} == set(kept)
    rec.settle(result.best["plan_id"])
    assert [p.plan_id for p in plans.list(status=PlanStatus.TRIALLED)] == [kept[0]]
    assert {p.plan_id for p in plans.list(status=PlanStatus.SUPERSEDED, limit=100)} == set(kept[1:])
    plans.transition(kept[0], PlanStatus.APPROVED, "policy", "approved")
