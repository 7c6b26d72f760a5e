"""Per-class speculation search against scripted evidence: which draft and k are kept, the
latency and exact-match rules at their boundaries, and the message when nothing pays."""
from __future__ import annotations

import pytest

from headroom_sidecar.controlplane.planner.search import Phase, TrialError
from headroom_sidecar.controlplane.planner.speculation import (SpeculationSearch, candidates,
                                                               class_plan_doc, judge)
from headroom_sidecar.proto.plan import Plan
from headroom_sidecar.proto.plandoc import TransformKind

FP = "0f" * 32
BASE = {"schema": "headroom.plan/v1", "plan_id": "default", "version": 1, "model_fingerprint": FP,
        "query_classes": [], "mode": "structural", "transforms": [], "notes": ""}
SKIP = {"kind": "skip_layers", "layers": [1]}
DRAFT = [{"kind": "weight_precision", "layers": {"0": "int8"}}]


def _spec(doc: dict) -> dict | None:
    ex = next((t for t in doc["transforms"] if t["kind"] == "execution"), {})
    return ex.get("speculative")


def scripted(ratios: dict, exact: dict | None = None, fail: tuple = ()):
    """evaluate(doc) -> evidence from (draft, k) -> latency ratio; calls in `seen`."""
    seen = []

    def evaluate(doc):
        spec = _spec(doc)
        key = (spec["draft"], spec["k"]) if spec else ("none", 0)        # ("none", 0): the bar
        seen.append(key)
        if key in fail:
            raise TrialError("agent gone")
        return {"latency_ratio": ratios[key], "exact_match": (exact or {}).get(key, 1.0)}
    return evaluate, seen


@pytest.mark.parametrize("evidence, kept, why", [
    ({"latency_ratio": 0.999, "exact_match": 1.0}, True, "kept"),
    ({"latency_ratio": 1.0, "exact_match": 1.0}, False, "not below 1"),        # the boundary
    ({"latency_ratio": 0.5, "exact_match": 0.999}, False, "exact match 0.999 < 1"),
    ({"latency_ratio": 0.5}, False, "exact match nan"),
    ({"latency_ratio": 0.5, "exact_match": 1.0, "error": "oom"}, False, "trial failed: oom"),
])
def test_judge_at_the_boundaries(evidence, kept, why):
    ok, reason = judge(evidence, 1.0)
    assert ok is kept and why in reason


def test_candidates_are_prompt_lookup_k_3_6_12_and_self_only_with_a_draft_plan():
    words = lambda cs: [(c.draft.value, c.k) for c in cs]
    assert words(candidates(None)) == [("prompt_lookup", 3), ("prompt_lookup", 6),
                                       ("prompt_lookup", 12)]
    assert words(candidates(DRAFT))[3:] == [("self", 3), ("self", 6), ("self", 12)]


def test_the_class_plan_is_the_default_plus_speculation_scoped_to_the_class():
    base = {**BASE, "transforms": [SKIP]}
    cand = candidates(DRAFT)[4]                                           # self, k=6
    doc = class_plan_doc(base, "code", cand, DRAFT, "job-s001", "n")
    plan = Plan.from_doc(doc)
    assert plan.query_classes == ("code",) and plan.get(TransformKind.SKIP_LAYERS).layers == (1,)
    assert _spec(doc) == {"draft": "self", "k": 6, "draft_plan": {"transforms": DRAFT}}


def test_the_fastest_exact_candidate_is_chosen_and_only_it_is_kept():
    evaluate, seen = scripted({("prompt_lookup", 3): 0.8, ("prompt_lookup", 6): 0.6,
                               ("prompt_lookup", 12): 0.7, ("self", 3): 0.55, ("self", 6): 0.5,
                               ("self", 12): 0.4},
                              exact={("self", 12): 0.9})
    recorded = []
    result = SpeculationSearch(evaluate, record=recorded.append).run(BASE, "code", "job", DRAFT)
    assert len(seen) == 6 and [r.index for r in recorded] == [1, 2, 3, 4, 5, 6]
    assert result.best_trial.change == "self k=6" and _spec(result.best)["k"] == 6
    assert [r.kept for r in result.trail] == [False, False, False, False, True, False]
    assert "exact match 0.900 < 1" in result.trail[5].reason          # faster, but not exact
    assert "self k=6 is faster (0.500)" in result.trail[0].reason
    assert all(r.phase is Phase.SPECULATION for r in result.trail)
    assert result.message.startswith("speculation for class 'code': self k=6, latency ratio 0.500")


def test_a_class_where_speculation_does_not_pay_is_left_alone():
    evaluate, _ = scripted({("prompt_lookup", 3): 1.0, ("prompt_lookup", 6): 1.02,
                            ("prompt_lookup", 12): 1.3})
    result = SpeculationSearch(evaluate).run(BASE, "creative", "job")
    assert result.best is None and not any(r.kept for r in result.trail)
    assert result.message == ("speculation does not pay for class 'creative': best ratio 1.000 "
                              "(prompt_lookup k=3; dropped: latency ratio 1.000 over the "
                              "unoptimised model not below 1); "
                              "the class is left alone")


def test_a_policy_bound_below_one_is_the_bar():
    evaluate, _ = scripted({("prompt_lookup", 3): 0.9, ("prompt_lookup", 6): 0.95,
                            ("prompt_lookup", 12): 0.96})
    assert SpeculationSearch(evaluate, max_latency_ratio=0.9).run(BASE, "c", "j").best is None
    assert SpeculationSearch(evaluate, max_latency_ratio=0.901).run(BASE, "c", "j").best is not None


def test_failed_trials_are_dropped_and_max_trials_caps_the_candidates():
    evaluate, seen = scripted({("prompt_lookup", 3): 0.9, ("prompt_lookup", 6): 0.8},
                              fail=(("prompt_lookup", 6),))
    result = SpeculationSearch(evaluate, max_trials=2).run(BASE, "code", "job")
    assert seen == [("prompt_lookup", 3), ("prompt_lookup", 6)]
    assert result.best_trial.change == "prompt_lookup k=3"
    assert "trial failed: agent gone" in result.trail[1].reason


def test_a_default_with_a_static_cache_leaves_no_room_and_runs_no_trial():
    base = {**BASE, "transforms": [{"kind": "execution", "static_kv_cache": True, "compile": "none"}]}
    evaluate, seen = scripted({})
    result = SpeculationSearch(evaluate).run(base, "code", "job")
    assert seen == [] and result.best is None and "leaves no room" in result.message


def test_a_trigger_without_a_class_is_refused():
    with pytest.raises(ValueError, match="per query class"):
        SpeculationSearch(scripted({})[0]).run(BASE, "", "job")


def test_over_a_default_plan_the_default_itself_is_the_bar():
    # Int8-like default: it matches the unoptimised output half the time and is 0.8x its latency.
    base = {**BASE, "plan_id": "p-default", "transforms": [SKIP]}
    evaluate, seen = scripted({("none", 0): 0.8, ("prompt_lookup", 3): 0.7,
                               ("prompt_lookup", 6): 0.6, ("prompt_lookup", 12): 0.8},
                              exact={("none", 0): 0.5, ("prompt_lookup", 3): 0.5,
                                     ("prompt_lookup", 6): 0.4, ("prompt_lookup", 12): 0.5})
    result = SpeculationSearch(evaluate).run(base, "code", "job")
    bar, k3, k6, k12 = result.trail
    assert seen[0] == ("none", 0) and _spec(bar.plan) is None and bar.plan["query_classes"] == ["code"]
    assert not bar.kept and "the bar" in bar.reason
    assert k3.kept and "0.875 over the default plan 'p-default'" in k3.reason
    assert not k6.kept and "exact match 0.400 < 0.5 of the default plan" in k6.reason
    assert not k12.kept and "latency ratio 1.000 over the default plan 'p-default' not below 1" in k12.reason
    assert result.message.startswith("speculation for class 'code': prompt_lookup k=3, latency "
                                     "ratio 0.875 over the default plan 'p-default'")


def test_a_default_that_cannot_be_measured_leaves_the_class_alone():
    base = {**BASE, "transforms": [SKIP]}
    evaluate, seen = scripted({}, fail=(("none", 0),))
    result = SpeculationSearch(evaluate).run(base, "code", "job")
    assert seen == [("none", 0)] and result.best is None
    assert "the default plan could not be measured as the bar" in result.message
