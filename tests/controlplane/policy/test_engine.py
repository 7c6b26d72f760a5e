import hashlib
import json
import re

import pytest

from headroom_sidecar.controlplane.policy import (
    Context, Evidence, ModelFacts, Outcome, PlanError, RuleOutcome, evaluate, load_policy_set,
    plan_sha256)
from headroom_sidecar.controlplane.policy.plan import TransformKind, plan_view
from headroom_sidecar.controlplane.policy.risk import RiskLevel, risk_level, risk_score
from tests.controlplane.policy.conftest import NOW_S, inputs

METRIC_MIN = "- {id: r, kind: metric_bound, metric: top1_agreement, min: 0.98}"
METRIC_MIN_HUMAN = "- {id: r, kind: metric_bound, metric: top1_agreement, min: 0.98, on_fail: needs_human}"
METRIC_OPTIONAL = "- {id: r, kind: metric_bound, metric: exact_match, min: 0.9, required: false}"
METRIC_MAX = "- {id: r, kind: metric_bound, metric: ppl_ratio, max: 1.01}"
PROTECT = "- {id: r, kind: protect, layers: [0, -1]}"
PROTECT_HUMAN = "- {id: r, kind: protect, layers: [-1], on_fail: needs_human}"
PROTECT_ATTN = "- {id: r, kind: protect, components: [{component: attention, layers: [3]}]}"
PROTECT_MLP = "- {id: r, kind: protect, components: [{component: mlp, layers: [3]}]}"
PROTECT_HEAD = "- {id: r, kind: protect, components: [{component: lm_head}]}"
CAP_HEADS = "- {id: r, kind: removal_cap, unit: heads, max_fraction: 0.25}"
CAP_HEADS_HUMAN = "- {id: r, kind: removal_cap, unit: heads, max_fraction: 0.25, on_fail: needs_human}"
CAP_LAYERS = "- {id: r, kind: removal_cap, unit: layers, max_fraction: 0.25}"
CAP_PER_LAYER = "- {id: r, kind: removal_cap, unit: heads_per_layer, max_fraction: 0.5}"
FORBID = "- {id: r, kind: transform_access, scope: {tenants: ['acme*']}, forbid: [skip_layers]}"
FORBID_HUMAN = ("- {id: r, kind: transform_access, scope: {routes: ['chat']}, forbid: [skip_layers],"
                " on_fail: needs_human}")
ALLOW = "- {id: r, kind: transform_access, scope: {routes: ['ch*']}, allow: [prune_heads, execution]}"
RISK = "- {id: r, kind: risk_approval, at_or_above: high}"
RISK_REJECT = "- {id: r, kind: risk_approval, at_or_above: medium, on_fail: reject}"
RATE = "- {id: r, kind: rate_limit, max_applies: 2, window_s: 600}"
RATE_HUMAN = "- {id: r, kind: rate_limit, max_applies: 2, window_s: 600, on_fail: needs_human}"
DET = "- {id: r, kind: determinism, routes: [batch-*]}"
DET_HUMAN = "- {id: r, kind: determinism, tenants: [bank], on_fail: needs_human}"
LATENCY = "- {id: r, kind: latency, max_ratio: 1.0}"
LATENCY_HUMAN = "- {id: r, kind: latency, max_ratio: 1.0, on_fail: needs_human}"
LATENCY_TRADE = ("- {id: r, kind: latency, max_ratio: 1.2, trade: memory, scope: {routes: [batch-*]},"
                 " reason: sized by memory}")
LATENCY_WITH_TRADE = f"{LATENCY}\n{LATENCY_TRADE.replace('id: r', 'id: t')}"

SKIP_2 = {"transforms": [{"kind": "skip_layers", "layers": [2, 4]}]}  # 2/8 layers: high risk
SKIP_LAST = {"transforms": [{"kind": "skip_layers", "layers": [7]}]}
PRUNE_9 = {"transforms": [{"kind": "prune_heads", "heads": {"2": [0, 1, 2], "3": [0, 1, 2], "4": [0, 1, 2]}}]}
TWO_RECENT = {"recent_applies_s": [NOW_S - 100, NOW_S - 500]}
OLD_RECENT = {"recent_applies_s": [NOW_S - 100, NOW_S - 700]}
BATCH = {"route": "batch-scoring"}
# mode "dynamic" allows only activation_sparsity (proto/plan_parse.py)
DYNAMIC = {"mode": "dynamic", "transforms": [{"kind": "activation_sparsity", "thresholds": {"3": 0.01}}]}
A, R, H = Outcome.APPROVE, Outcome.REJECT, Outcome.NEEDS_HUMAN
P, F, NH, NA = RuleOutcome.PASS, RuleOutcome.FAIL, RuleOutcome.NEEDS_HUMAN, RuleOutcome.NOT_APPLICABLE

CASES = [
    # (id, rule, overrides, decision, rule outcome)
    ("metric-pass", METRIC_MIN, {}, A, P),
    ("metric-below-min", METRIC_MIN, {"evidence": {"top1_agreement": 0.97}}, R, F),
    ("metric-at-min-is-inclusive", METRIC_MIN, {"evidence": {"top1_agreement": 0.98}}, A, P),
    ("metric-human", METRIC_MIN_HUMAN, {"evidence": {"top1_agreement": 0.97}}, H, NH),
    ("metric-missing-required", METRIC_MIN, {"evidence": {"top1_agreement": None}}, R, F),
    ("metric-missing-optional", METRIC_OPTIONAL, {"evidence": {"exact_match": None}}, A, NA),
    ("metric-above-max", METRIC_MAX, {"evidence": {"ppl_ratio": 1.02}}, R, F),
    ("protect-pass", PROTECT, {}, A, P),
    ("protect-negative-index", PROTECT, {"plan": SKIP_LAST}, R, F),
    ("protect-human", PROTECT_HUMAN, {"plan": SKIP_LAST}, H, NH),
    ("protect-attention", PROTECT_ATTN, {}, R, F),
    ("protect-mlp-not-attention", PROTECT_MLP, {}, A, P),
    ("protect-mlp-sparsity", PROTECT_MLP,
     {"plan": {"transforms": [{"kind": "activation_sparsity", "thresholds": {"3": 0.1}}]}}, R, F),
    ("protect-lm-head", PROTECT_HEAD,
     {"plan": {"transforms": [{"kind": "weight_precision", "layers": {"lm_head": "int8"}}]}}, R, F),
    ("cap-pass", CAP_HEADS, {}, A, P),
    ("cap-heads-over", CAP_HEADS, {"plan": PRUNE_9}, R, F),
    ("cap-human", CAP_HEADS_HUMAN, {"plan": PRUNE_9}, H, NH),
    ("cap-layers-at-cap", CAP_LAYERS, {"plan": SKIP_2}, A, P),
    ("cap-layers-over", CAP_LAYERS,
     {"plan": {"transforms": [{"kind": "skip_layers", "layers": [1, 2, 3]}]}}, R, F),
    ("cap-per-layer-over", CAP_PER_LAYER,
     {"plan": {"transforms": [{"kind": "prune_heads", "heads": {"3": [0, 1, 2]}}]}}, R, F),
    ("access-pass", FORBID, {}, A, P),
    ("access-forbidden", FORBID, {"plan": SKIP_2}, R, F),
    ("access-glob-no-match", FORBID, {"plan": SKIP_2, "context": {"tenant": "globex"}}, A, NA),
    ("access-human", FORBID_HUMAN, {"plan": SKIP_2}, H, NH),
    ("access-allow-list", ALLOW, {"plan": SKIP_2}, R, F),
    ("access-allow-ok", ALLOW, {}, A, P),
    ("risk-low", RISK, {}, A, P),
    ("risk-high", RISK, {"plan": SKIP_2}, H, NH),
    ("risk-reject", RISK_REJECT, {"plan": PRUNE_9}, R, F),
    ("rate-pass", RATE, {"context": OLD_RECENT}, A, P),
    ("rate-full", RATE, {"context": TWO_RECENT}, R, F),
    ("rate-human", RATE_HUMAN, {"context": TWO_RECENT}, H, NH),
    ("det-other-route", DET, {"plan": DYNAMIC}, A, NA),
    ("det-pass", DET, {"context": BATCH}, A, P),
    ("det-dynamic", DET, {"context": BATCH, "plan": DYNAMIC}, R, F),
    ("det-query-classes", DET, {"context": BATCH, "plan": {"query_classes": ["code"]}}, R, F),
    ("det-probe-differs", DET,
     {"context": BATCH, "evidence": {"determinism_probe": {"runs": 2, "bitwise_identical": False}}}, R, F),
    ("det-probe-one-run", DET,
     {"context": BATCH, "evidence": {"determinism_probe": {"runs": 1, "bitwise_identical": True}}}, R, F),
    ("det-requested", DET,
     {"context": {"requires_determinism": True}, "evidence": {"determinism_probe": None}}, R, F),
    ("det-human", DET_HUMAN, {"context": {"tenant": "bank"}, "plan": DYNAMIC}, H, NH),
    ("latency-faster", LATENCY, {}, A, P),
    ("latency-equal-is-inclusive", LATENCY, {"evidence": {"latency_ratio": 1.0}}, A, P),
    ("latency-slower", LATENCY, {"evidence": {"latency_ratio": 1.01}}, R, F),
    ("latency-human", LATENCY_HUMAN, {"evidence": {"latency_ratio": 1.01}}, H, NH),
    ("latency-not-measured", LATENCY, {"evidence": {"latency_ratio": None}}, R, F),
    ("latency-too-few-pairs", LATENCY, {"evidence": {"latency_pairs": 3}}, R, F),
    ("latency-min-pairs-is-inclusive", LATENCY, {"evidence": {"latency_pairs": 4}}, A, P),
    ("latency-no-pairs", LATENCY, {"evidence": {"latency_pairs": None}}, R, F),
    # Where a trade applies, the untraded rule steps aside (not_applicable) ...
    ("latency-superseded", LATENCY_WITH_TRADE,
     {"evidence": {"latency_ratio": 1.1}, "context": BATCH}, A, NA),
    # ... and only there.
    ("latency-trade-elsewhere", LATENCY_WITH_TRADE, {"evidence": {"latency_ratio": 1.1}}, R, F),
]


@pytest.mark.parametrize("rule,overrides,decision,rule_outcome",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule_kind_outcomes(policy_dir, rule, overrides, decision, rule_outcome):
    policy_set = load_policy_set(str(policy_dir(rule)))
    d = evaluate(policy_set, **inputs(**overrides))
    assert (d.outcome, d.results[0].outcome) == (decision, rule_outcome), d.results[0].message


def test_every_rule_kind_has_every_outcome_covered():
    from headroom_sidecar.controlplane.policy import RuleKind
    seen = {(c[1].split("kind: ")[1].split(",")[0], c[3]) for c in CASES}
    for kind in RuleKind:
        assert {(kind.value, A), (kind.value, R), (kind.value, H)} <= seen, kind


def test_a_trade_has_its_own_bound(policy_dir):
    policy_set = load_policy_set(str(policy_dir(LATENCY_WITH_TRADE)))
    ok = evaluate(policy_set, **inputs(evidence={"latency_ratio": 1.2}, context=BATCH))
    over = evaluate(policy_set, **inputs(evidence={"latency_ratio": 1.21}, context=BATCH))
    assert ok.outcome is A and "memory first: sized by memory" in ok.results[1].message
    assert "superseded by t" in ok.results[0].message
    assert over.outcome is R and [r.rule_id for r in over.failing()] == ["t"]


@pytest.mark.parametrize("rule, error", [
    ("- {id: r, kind: latency, max_ratio: 1.2, trade: memory}", "must say why"),
    ("- {id: r, kind: latency, max_ratio: 0}", "must be > 0"),
    ("- {id: r, kind: latency, max_ratio: 1.0, min_pairs: 0}", "must be >= 1"),
    ("- {id: r, kind: latency, max_ratio: 1.0, trade: speed, reason: x}", "trade"),
])
def test_latency_rules_are_validated(policy_dir, rule, error):
    from headroom_sidecar.controlplane.policy import PolicyError
    with pytest.raises(PolicyError, match=error):
        load_policy_set(str(policy_dir(rule)))


def test_reject_beats_needs_human_beats_approve(policy_dir):
    rules = f"{METRIC_MIN}\n{RISK.replace('id: r', 'id: risk')}"
    policy_set = load_policy_set(str(policy_dir(rules)))
    assert evaluate(policy_set, **inputs(plan=SKIP_2)).outcome is H
    both = evaluate(policy_set, **inputs(plan=SKIP_2, evidence={"top1_agreement": 0.5}))
    assert both.outcome is R
    assert [r.outcome for r in both.results] == [F, NH]


def test_result_carries_rule_location_value_threshold_and_revision(policy_dir):
    folder = policy_dir(f"{METRIC_MAX}\n{CAP_HEADS.replace('id: r', 'id: cap')}")
    policy_set = load_policy_set(str(folder))
    d = evaluate(policy_set, **inputs(evidence={"ppl_ratio": 1.02}, plan=PRUNE_9))
    bound, cap = d.results
    assert (bound.rule_id, bound.file, bound.line, bound.kind) == ("r", str(folder / "p.yaml"), 3, "metric_bound")
    assert (bound.measured, bound.threshold) == (1.02, {"max": 1.01})
    assert (cap.line, cap.measured, cap.threshold) == (4, 9 / 32, 0.25)
    assert "1.02 > max 1.01" in bound.message
    assert d.revision == policy_set.revision and len(d.revision.content_sha256) == 64
    assert json.loads(json.dumps(d.to_dict()))["outcome"] == "reject"


def test_plan_hash_is_sha256_of_canonical_json():
    doc = inputs(plan={"notes": "café"})["plan"]
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert plan_sha256(doc) == hashlib.sha256(canonical).hexdigest()
    assert plan_sha256(dict(reversed(list(doc.items())))) == plan_sha256(doc)


@pytest.mark.parametrize("transforms,mode,level", [
    ([{"kind": "execution", "static_kv_cache": True, "compile": "cuda_graph"}], "structural", RiskLevel.LOW),
    ([{"kind": "skip_layers", "layers": [12, 14]}], "structural", RiskLevel.MEDIUM),   # 0.067
    ([{"kind": "skip_layers", "layers": [10, 12, 14, 16, 18]}], "structural", RiskLevel.HIGH),  # 0.167
    ([{"kind": "weight_precision", "layers": {str(i): "int8" for i in range(30)}}], "structural",
     RiskLevel.MEDIUM),  # 0.1
    ([{"kind": "prune_heads", "heads": {"5": [0]}}], "structural", RiskLevel.LOW),      # 0.0019
    ([{"kind": "activation_sparsity", "thresholds": {"5": 0.1}}], "structural", RiskLevel.LOW),  # 0.0083
    ([{"kind": "activation_sparsity", "thresholds": {"5": 0.1}}], "dynamic", RiskLevel.MEDIUM),  # 0.0583
])
def test_risk_formula_examples_from_readme(transforms, mode, level):
    plan = inputs(plan={"transforms": transforms, "mode": mode})["plan"]
    assert risk_level(risk_score(plan_view(plan, ModelFacts(30, 9)))) is level


@pytest.mark.parametrize("plan,where", [
    ({"transforms": [{"kind": "prune_heads", "heads": {"3": [4]}}]}, "plan.transforms[0].heads.3"),
    ({"transforms": [{"kind": "skip_layers", "layers": [8]}]}, "plan.transforms[0].layers"),
    ({"transforms": [{"kind": "fold_layers"}]}, "plan.transforms[0].kind"),
    ({"mode": "adaptive"}, "plan.mode"),
    ({"schema": "headroom.plan/v0"}, "plan.schema"),
    ({"transforms": [{"kind": "weight_precision", "layers": {"2": "fp4"}}]}, "plan.transforms[0].layers.2"),
])
def test_malformed_plan_is_refused_with_its_field(policy_dir, plan, where):
    policy_set = load_policy_set(str(policy_dir(METRIC_MIN)))
    with pytest.raises(PlanError, match="^" + re.escape(where) + ":"):
        evaluate(policy_set, **inputs(plan=plan))


def test_evidence_unknown_key_is_an_error_unless_lenient():
    with pytest.raises(ValueError, match="top1_agrement"):
        Evidence.from_dict({"top1_agrement": 0.9})
    lenient = Evidence.from_dict({"top1_agreement": 0.9, "trial_id": "t1"}, strict=False)
    assert (lenient.top1_agreement, lenient.extra) == (0.9, {"trial_id": "t1"})
    with pytest.raises(ValueError, match="evidence.ppl_ratio"):
        Evidence.from_dict({"ppl_ratio": "1.0"})


def test_injected_clock_decides_the_rate_window(policy_dir):
    policy_set = load_policy_set(str(policy_dir(RATE)))
    ins = inputs(context={"now_s": None, **TWO_RECENT})
    assert evaluate(policy_set, **ins, clock=lambda: NOW_S).outcome is R
    later = evaluate(policy_set, **ins, clock=lambda: NOW_S + 150)  # one apply left the window
    assert (later.outcome, later.results[0].measured, later.evaluated_at_s) == (A, 1, NOW_S + 150)


def test_typed_inputs_are_accepted(policy_dir):
    policy_set = load_policy_set(str(policy_dir(DET)))
    ins = inputs()
    d = evaluate(policy_set, ins["plan"], Evidence.from_dict(ins["evidence"]), ModelFacts(8, 4),
                 Context(route="batch-x", now_s=NOW_S))
    assert d.outcome is A and d.results[0].outcome is P


def test_head_precision_written_by_the_control_plane_is_read_by_the_shipped_policies():
    from headroom_sidecar.proto.plan import Plan, Precision, WeightPrecision
    from headroom_sidecar.controlplane.policy.plan import Component, Touch
    from tests.controlplane.policy.conftest import SHIPPED_POLICIES
    doc = Plan("p-head", 1, "ab" * 32,
                  (WeightPrecision({3: Precision.INT8}, Precision.INT8),)).to_doc()
    assert doc["transforms"][0]["layers"] == {"3": "int8", "lm_head": "int8"}
    view = plan_view(doc, ModelFacts(8, 4))
    assert view.precision_layers == {3}           # the head is not a layer
    assert Touch(TransformKind.WEIGHT_PRECISION, Component.LM_HEAD, None) in view.touches
    assert risk_score(view) == pytest.approx(0.10 * 1 / 8 + 0.05)
    shipped = load_policy_set(str(SHIPPED_POLICIES))
    d = evaluate(shipped, **inputs(plan=doc))
    protect = next(r for r in d.results if r.rule_id == "structure.protect-edges")
    # The edges forbid removal and masking, not weight-only int8: the quality rules judge that.
    assert (d.outcome, protect.outcome, protect.measured) == (A, P, [])
    assert "allowed here: weight_precision changes lm_head" in protect.message
    worse = evaluate(shipped, **inputs(plan=doc, evidence={"top1_agreement": 0.9}))
    assert [r.rule_id for r in worse.failing()] == ["quality.top1-agreement"]


# ------------------------------------------------------------------ protect: transforms
# One transform of each kind that changes a part of layer 0 (8 layers, 4 heads).
TOUCH_LAYER_0 = {
    TransformKind.PRUNE_HEADS: {"kind": "prune_heads", "heads": {"0": [1]}},
    TransformKind.SKIP_LAYERS: {"kind": "skip_layers", "layers": [0]},
    TransformKind.ACTIVATION_SPARSITY: {"kind": "activation_sparsity", "thresholds": {"0": 0.1}},
    TransformKind.WEIGHT_PRECISION: {"kind": "weight_precision", "layers": {"0": "int8"}},
}
EXECUTION = {"kind": "execution", "static_kv_cache": True, "compile": "none"}


def _protect_result(policy_dir, rule: str, *transforms):
    policy_set = load_policy_set(str(policy_dir(rule)))
    d = evaluate(policy_set, **inputs(plan={"transforms": list(transforms)}))
    return policy_set.rules[0].params, d.outcome, d.results[0]


@pytest.mark.parametrize("plan_kind", list(TOUCH_LAYER_0), ids=lambda k: k.value)
def test_protect_without_transforms_forbids_every_kind(policy_dir, plan_kind):
    params, outcome, result = _protect_result(policy_dir, "- {id: r, kind: protect, layers: [0]}",
                                              TOUCH_LAYER_0[plan_kind])
    assert params.transforms == tuple(TransformKind)
    assert (outcome, result.outcome) == (R, F)
    assert result.measured[0].startswith(f"{plan_kind.value} changes layer 0 ")
    assert result.threshold["transforms"] == [k.value for k in TransformKind]


def test_protect_without_transforms_passes_execution(policy_dir):
    _, outcome, result = _protect_result(policy_dir, "- {id: r, kind: protect, layers: [0]}", EXECUTION)
    assert (outcome, result.outcome, result.message) == (A, P, "no protected part is changed")


@pytest.mark.parametrize("listed", list(TOUCH_LAYER_0), ids=lambda k: f"forbid-{k.value}")
@pytest.mark.parametrize("plan_kind", list(TOUCH_LAYER_0), ids=lambda k: f"plan-{k.value}")
def test_protect_fails_exactly_the_listed_kind(policy_dir, listed, plan_kind):
    rule = f"- {{id: r, kind: protect, layers: [0], transforms: [{listed.value}]}}"
    params, outcome, result = _protect_result(policy_dir, rule, TOUCH_LAYER_0[plan_kind])
    assert params.transforms == (listed,)
    if plan_kind is listed:
        assert (outcome, result.outcome) == (R, F)
        assert all(m.startswith(f"{listed.value} changes layer 0 ") for m in result.measured)
        assert "allowed here" not in result.message
    else:
        assert (outcome, result.outcome, result.measured) == (A, P, [])
        assert f"allowed here: {plan_kind.value} changes layer 0 " in result.message


EDGES = ("- {id: r, kind: protect, layers: [0, -1], components: [{component: lm_head}],\n"
         "   transforms: [prune_heads, skip_layers, activation_sparsity]}")
HEAD_INT8 = {"kind": "weight_precision", "layers": {"lm_head": "int8", "7": "int8"}}


@pytest.mark.parametrize("transforms,outcome,measured,allowed", [
    ([HEAD_INT8], A, [], ["weight_precision changes layer 7 attention",
                          "weight_precision changes layer 7 mlp", "weight_precision changes lm_head"]),
    ([{"kind": "skip_layers", "layers": [7]}], R,
     ["skip_layers changes layer 7 attention", "skip_layers changes layer 7 mlp"], []),
    ([{"kind": "activation_sparsity", "thresholds": {"7": 0.2}}], R,
     ["activation_sparsity changes layer 7 mlp"], []),
    ([HEAD_INT8, {"kind": "prune_heads", "heads": {"0": [2]}}], R,
     ["prune_heads changes layer 0 attention"], ["weight_precision changes layer 7 attention",
                                                 "weight_precision changes layer 7 mlp",
                                                 "weight_precision changes lm_head"]),
], ids=["int8-edges-and-head", "skip-last", "sparsity-last", "int8-head-and-prune-first"])
def test_protect_says_which_kind_changed_which_part(policy_dir, transforms, outcome, measured, allowed):
    _, got, result = _protect_result(policy_dir, EDGES, *transforms)
    assert (got, result.measured) == (outcome, measured)
    assert result.threshold == {
        "parts": ["layer 0 attention", "layer 0 mlp", "layer 7 attention", "layer 7 mlp", "lm_head"],
        "transforms": ["prune_heads", "skip_layers", "activation_sparsity"]}
    for change in measured + allowed:
        assert change in result.message
    assert ("allowed here: " + "; ".join(allowed) in result.message) == bool(allowed)
