"""The plan store: plans, status moves along plan_status.TRANSITIONS, trials, decisions,
applications. (The document rules: tests/proto/test_plan.py; the diff: test_plan_diff.py.)"""
import threading

import duckdb
import pytest

from headroom_sidecar.controlplane.plan_status import TRANSITIONS, IllegalTransition
from headroom_sidecar.controlplane.plans import (ApplicationState, Decision, PlanStore,
                                                 RolloutStage)
from headroom_sidecar.controlplane.policy.types import Outcome
from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.proto.plan import parse_plan
from tests.proto.plandocs import doc


@pytest.fixture
def store(tmp_path):
    con = duckdb.connect(str(tmp_path / "plans.duckdb"))
    yield PlanStore(con, threading.Lock())
    con.close()


# ---------------------------------------------------------------- store

def test_add_get_list(store):
    a = store.add(doc(), "planner")
    assert a.status == PlanStatus.PROPOSED and a.sha256 == parse_plan(doc()).sha256
    assert store.get("p-1").doc == parse_plan(doc()).to_doc()
    assert store.add(doc(), "planner") == a                      # same document: idempotent
    with pytest.raises(ValueError, match="different document"):
        store.add(doc(notes="changed"), "planner")
    store.add(doc(plan_id="p-2", query_classes=[]), "operator:alice")
    store.add(doc(plan_id="p-3", query_classes=["chat"], model_fingerprint="cd" * 32), "planner")
    assert [p.plan_id for p in store.list(query_class="code")] == ["p-2", "p-1"]
    assert [p.plan_id for p in store.list(fingerprint="cd" * 32)] == ["p-3"]
    store.transition("p-2", PlanStatus.REJECTED, "operator:alice", "no")
    assert [p.plan_id for p in store.list(status=PlanStatus.REJECTED)] == ["p-2"]
    assert store.get("nope") is None


def walk(store, plan_id, *statuses):
    for s in statuses:
        store.transition(plan_id, s, "planner", f"to {s.value}")


def test_happy_path_history(store):
    store.add(doc(), "planner")
    tid = store.start_trial("p-1", "agent:a1")
    store.finish_trial(tid, evidence={"top1_agreement": 0.99})
    walk(store, "p-1", PlanStatus.TRIALLED)
    store.record_decision(Decision("p-1", Outcome.APPROVE, [{"rule": "top1", "ok": True}],
                                   "rev-7", "h" * 64, "policy-engine", "all rules passed"))
    walk(store, "p-1", PlanStatus.APPROVED, PlanStatus.APPLYING)
    store.record_application("p-1", "a1", RolloutStage.CANARY, ApplicationState.APPLIED, "ok")
    walk(store, "p-1", PlanStatus.APPLIED, PlanStatus.ROLLED_BACK)
    h = store.history("p-1")
    assert [t.to_status for t in h.transitions] == [
        PlanStatus.PROPOSED, PlanStatus.TRIALLED, PlanStatus.APPROVED, PlanStatus.APPLYING,
        PlanStatus.APPLIED, PlanStatus.ROLLED_BACK]
    assert h.transitions[0].from_status is None and h.transitions[1].from_status == PlanStatus.PROPOSED
    assert h.trials[0].evidence == {"top1_agreement": 0.99} and h.trials[0].finished_at_us
    assert h.decisions[0].outcome == Outcome.APPROVE and h.decisions[0].policy_revision == "rev-7"
    assert h.applications[0].stage == RolloutStage.CANARY
    assert h.plan.status == PlanStatus.ROLLED_BACK


@pytest.mark.parametrize("path, illegal", [
    ((), PlanStatus.APPROVED),                              # approval needs a trial first
    ((PlanStatus.TRIALLED, PlanStatus.APPROVED, PlanStatus.APPLYING, PlanStatus.APPLIED,
      PlanStatus.ROLLED_BACK), PlanStatus.APPLYING),        # rolled back: re-trial first
    ((PlanStatus.REJECTED,), PlanStatus.TRIALLED),          # terminal
    ((PlanStatus.SUPERSEDED,), PlanStatus.APPROVED),        # terminal
    ((PlanStatus.TRIALLED,), PlanStatus.APPLYING),          # apply needs approval
])
def test_illegal_transitions_are_refused(store, path, illegal):
    store.add(doc(), "planner")
    walk(store, "p-1", *path)
    before = store.history("p-1").transitions
    with pytest.raises(IllegalTransition, match=f"-> {illegal.value}"):
        store.transition("p-1", illegal, "operator:bob", "try")
    assert store.history("p-1").transitions == before


def test_rolled_back_plan_comes_back_through_a_new_trial(store):
    store.add(doc(), "planner")
    walk(store, "p-1", PlanStatus.TRIALLED, PlanStatus.APPROVED, PlanStatus.APPLYING,
         PlanStatus.FAILED, PlanStatus.APPLYING, PlanStatus.APPLIED, PlanStatus.ROLLED_BACK,
         PlanStatus.TRIALLED, PlanStatus.APPROVED)
    assert store.get("p-1").status == PlanStatus.APPROVED


def test_every_status_has_a_rule():
    assert set(TRANSITIONS) == set(PlanStatus)


def test_trial_errors(store):
    store.add(doc(), "planner")
    with pytest.raises(KeyError):
        store.start_trial("nope", "a1")
    tid = store.start_trial("p-1", "a1", trial_id="t-1")
    with pytest.raises(ValueError, match="exactly one"):
        store.finish_trial(tid)
    assert store.finish_trial(tid, error="agent refused: fingerprint").error == "agent refused: fingerprint"
    with pytest.raises(ValueError, match="already finished"):
        store.finish_trial(tid, evidence={})
    with pytest.raises(ValueError):
        store.record_decision(Decision("p-1", "maybe", [], "r", "h", "policy-engine", ""))
