"""execution.speculative in the plan vocabulary: the one parser (proto/plan.py) accepts and
refuses each document, the normal form round-trips with the same meaning, and the fit rules
(proto/plan_fit.py, agent/plan.py) check the draft plan like the plan."""
from __future__ import annotations

import pytest

from headroom_sidecar.agent.plan import check_fit
from headroom_sidecar.controlplane.plan_diff import plan_diff
from headroom_sidecar.proto.plan import Plan, PlanError, SpeculativeDraft
from headroom_sidecar.proto.plan_fit import check_fits
from headroom_sidecar.proto.plandoc import DRAFT_PLAN_KINDS, SPECULATIVE_K_MAX, TransformKind, plan_hash
from tests.agent.executor import plan_doc, rig
from tests.agent.executor.speculative import INT8_ALL, SKIP_1, execution, self_spec
from tests.builders import ARCH_BUILDERS

FP = "a" * 64
LOOKUP = {"draft": "prompt_lookup", "k": 4}

# (document's execution transform, valid?)
CASES = [
    ("lookup", execution(LOOKUP), True),
    ("self int8+skip", execution(self_spec(4, INT8_ALL, SKIP_1)), True),
    ("k=1 (lower bound)", execution({"draft": "prompt_lookup", "k": 1}), True),
    ("k=max (upper bound)", execution({"draft": "prompt_lookup", "k": SPECULATIVE_K_MAX}), True),
    ("k=0", execution({"draft": "prompt_lookup", "k": 0}), False),
    ("k=max+1", execution({"draft": "prompt_lookup", "k": SPECULATIVE_K_MAX + 1}), False),
    ("k bool", execution({"draft": "prompt_lookup", "k": True}), False),
    ("k missing", execution({"draft": "prompt_lookup"}), False),
    ("draft unknown", execution({"draft": "medusa", "k": 2}), False),
    ("draft null", execution({"draft": None, "k": 2}), False),
    ("unknown field", execution({**LOOKUP, "ngram": 3}), False),
    ("not an object", execution([LOOKUP]), False),
    ("lookup with draft_plan", execution({**LOOKUP, "draft_plan": {"transforms": [SKIP_1]}}), False),
    ("self without draft_plan", execution({"draft": "self", "k": 2}), False),
    ("self empty draft plan", execution(self_spec(2)), False),
    ("draft_plan not an object", execution({"draft": "self", "k": 2, "draft_plan": [SKIP_1]}), False),
    ("draft_plan extra field",
     execution({"draft": "self", "k": 2, "draft_plan": {"transforms": [SKIP_1], "x": 1}}), False),
    ("nested execution", execution(self_spec(2, execution()))
     , False),
    ("duplicate draft kind", execution(self_spec(2, SKIP_1, {"kind": "skip_layers", "layers": [0]})),
     False),
    ("bad draft transform", execution(self_spec(2, {"kind": "skip_layers", "layers": [-1]})), False),
    ("with static cache", execution(LOOKUP, static=True), False),
    ("with compile", execution(LOOKUP, static=True, compile="torch_compile"), False),
]


def _ok(doc: dict) -> bool:
    try:
        Plan.from_doc(doc)
        return True
    except PlanError:
        return False


@pytest.mark.parametrize("name,transform,valid", CASES, ids=[c[0] for c in CASES])
def test_the_parser_decides(name, transform, valid):
    assert _ok(plan_doc(FP, transform)) == valid


def test_the_vocabulary_is_shared():
    assert [d.value for d in SpeculativeDraft] == ["prompt_lookup", "self"]
    assert TransformKind.EXECUTION not in DRAFT_PLAN_KINDS


def test_agent_parse_and_apply_order():
    p = Plan.from_doc(plan_doc(FP, execution(self_spec(3, INT8_ALL, SKIP_1))))
    spec = p.get(TransformKind.EXECUTION).speculative
    assert (spec.draft, spec.k) == (SpeculativeDraft.SELF, 3)
    # skip before int8, whatever order the document lists them in
    assert [t.kind for t in spec.draft_transforms] == [TransformKind.SKIP_LAYERS,
                                                       TransformKind.WEIGHT_PRECISION]


def test_agent_errors_name_the_field():
    with pytest.raises(PlanError) as e:
        Plan.from_doc(plan_doc(FP, execution({"draft": "prompt_lookup", "k": 0})))
    assert str(e.value).startswith("plan.transforms[0].speculative.k: ")
    with pytest.raises(PlanError) as e:
        Plan.from_doc(plan_doc(FP, execution(self_spec(2, execution()))))
    assert str(e.value).startswith("plan.transforms[0].speculative.draft_plan.transforms[0].kind: ")


def test_controlplane_normal_form_round_trips_to_the_agent():
    doc = plan_doc(FP, execution(self_spec(2, INT8_ALL, SKIP_1)))
    cp = Plan.from_doc(doc)
    normal = cp.to_doc()
    assert [t["kind"] for t in normal["transforms"][0]["speculative"]["draft_plan"]["transforms"]] \
        == ["weight_precision", "skip_layers"]            # kind order, as the plan's own
    assert Plan.from_doc(normal).sha256 == cp.sha256
    agent = Plan.from_doc(normal)
    assert agent.hash == cp.sha256
    assert agent.get(TransformKind.EXECUTION).speculative.k == 2


def test_a_plan_without_speculation_keeps_its_hash():
    doc = plan_doc(FP, execution())
    assert "speculative" not in Plan.from_doc(doc).to_doc()["transforms"][0]
    assert Plan.from_doc(doc).sha256 == plan_hash(Plan.from_doc(doc).to_doc())


def test_fit_checks_draft_layers_against_the_model():
    cp = Plan.from_doc(plan_doc(FP, execution(self_spec(2, SKIP_1))))
    check_fits(cp, {"num_layers": 2, "num_heads": 4})               # layer 1 of 2: fits
    with pytest.raises(PlanError, match=r"draft_plan\.transforms\[0\]"):
        check_fits(cp, {"num_layers": 1, "num_heads": 4})           # layer 1 of 1: out of range
    every = Plan.from_doc(plan_doc(FP, execution(self_spec(2, {"kind": "skip_layers",
                                                              "layers": [0, 1]}))))
    with pytest.raises(PlanError, match="skips all 2 layers; the draft would be an identity"):
        check_fits(every, {"num_layers": 2, "num_heads": 4})
    check_fits(every, {"num_layers": 3, "num_heads": 4})


def test_controlplane_diff_says_what_speculates():
    lines = plan_diff(Plan.from_doc(plan_doc(FP, execution(self_spec(4, SKIP_1)))),
                      {"num_layers": 3, "num_heads": 4})
    assert any("speculative decoding, 4 tokens" in ln and "layer 1: skipped" in ln for ln in lines)


def test_agent_check_fit_on_the_draft_plan():
    r = rig(ARCH_BUILDERS["llama"]())                                # 3 layers
    ok = Plan.from_doc(plan_doc(r.fingerprint, execution(self_spec(2, {"kind": "skip_layers",
                                                                       "layers": [2]}))))
    check_fit(ok, r.structure, r.fingerprint, r.executor.supported())
    out = Plan.from_doc(plan_doc(r.fingerprint, execution(self_spec(2, {"kind": "skip_layers",
                                                                        "layers": [3]}))))
    with pytest.raises(PlanError, match=r"draft_plan.transforms\[0\].layers: layer\(s\) \[3\] out of range"):
        check_fit(out, r.structure, r.fingerprint, r.executor.supported())
    every = Plan.from_doc(plan_doc(r.fingerprint, execution(self_spec(
        2, {"kind": "skip_layers", "layers": [0, 1, 2]}))))
    with pytest.raises(PlanError, match="the draft would be an identity"):
        check_fit(every, r.structure, r.fingerprint, r.executor.supported())


def test_agent_refuses_a_draft_kind_the_model_cannot_run():
    r = rig(ARCH_BUILDERS["llama"]())
    p = Plan.from_doc(plan_doc(r.fingerprint, execution(self_spec(2, INT8_ALL))))
    check_fit(p, r.structure, r.fingerprint, {TransformKind.WEIGHT_PRECISION: None})
    with pytest.raises(PlanError, match="draft_plan.transforms.0..kind: weight_precision: not supported for .*: "
                                        "no int8 kernel"):
        check_fit(p, r.structure, r.fingerprint, {TransformKind.WEIGHT_PRECISION: "no int8 kernel"})
