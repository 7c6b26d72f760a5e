"""check_fits: one set of shape rules for agent, control plane and policy engine."""
from __future__ import annotations

import pytest

from headroom_sidecar.proto.plan import PlanError, parse_plan
from headroom_sidecar.proto.plan_fit import ModelFacts, check_fits
from tests.proto.test_plan import SPEC, doc

FACTS = ModelFacts(num_layers=4, num_heads=3)


def fits(*transforms, facts=FACTS) -> list[str]:
    return check_fits(parse_plan(doc(transforms=list(transforms))), facts)


def refused(*transforms, facts=FACTS) -> list[str]:
    with pytest.raises(PlanError) as e:
        fits(*transforms, facts=facts)
    return e.value.problems


@pytest.mark.parametrize("transform, field", [
    ({"kind": "skip_layers", "layers": [4]}, "layers"),
    ({"kind": "prune_heads", "heads": {"4": [0]}}, "heads"),
    ({"kind": "activation_sparsity", "thresholds": {"4": 0.1}}, "thresholds"),
    ({"kind": "weight_precision", "layers": {"4": "int8"}}, "layers"),
])
def test_layer_index_boundary(transform, field):
    assert refused(transform) == [f"plan.transforms[0].{field}: layer(s) [4] out of range "
                                  "(the model has 4 layers)"]
    at_edge = {k: (v.replace("4", "3") if isinstance(v, str) else v) for k, v in transform.items()}
    inner = transform[field]
    at_edge[field] = [3] if isinstance(inner, list) else {"3": next(iter(inner.values()))}
    assert fits(at_edge) == []


def test_head_index_boundary():
    assert fits({"kind": "prune_heads", "heads": {"1": [2]}}) == []
    assert refused({"kind": "prune_heads", "heads": {"1": [3]}}) == [
        "plan.transforms[0].heads.1: head(s) [3] out of range (the model has 3 query heads)"]


def test_skipping_every_layer_is_refused_one_less_fits():
    assert fits({"kind": "skip_layers", "layers": [0, 1, 2]}) == []
    assert refused({"kind": "skip_layers", "layers": [0, 1, 2, 3]}) == [
        "plan.transforms[0].layers: skips all 4 layers; the model would be an identity"]


def test_all_heads_of_a_layer_is_a_note_every_layer_without_attention_is_refused():
    notes = fits({"kind": "prune_heads", "heads": {"1": [0, 1, 2]}})
    assert notes == ["plan.transforms[0].heads.1: all 3 heads pruned; its attention contributes "
                     "nothing (its MLP still runs)"]
    problems = refused({"kind": "prune_heads", "heads": {"0": [0, 1, 2], "1": [0, 1, 2]}},
                       {"kind": "skip_layers", "layers": [2, 3]})
    assert problems == ["plan.transforms[0].heads: every layer would be left without attention"]


def test_transform_on_a_skipped_layer_is_a_note():
    notes = fits({"kind": "skip_layers", "layers": [1]},
                 {"kind": "activation_sparsity", "thresholds": {"1": 0.1, "2": 0.1}})
    assert notes == ["plan.transforms[0] (activation_sparsity): layer(s) [1] are skipped; "
                     "this has no effect there"]


def test_draft_plan_is_checked_like_the_plan():
    assert fits(SPEC) == []                     # draft skips layer 3 of 4, int8 on layer 1
    problems = refused(SPEC, facts=ModelFacts(3, 3))
    assert problems == ["plan.transforms[0].speculative.draft_plan.transforms[1].layers: "
                        "layer(s) [3] out of range (the model has 3 layers)"]


def test_every_problem_at_once_with_the_plan_id():
    with pytest.raises(PlanError) as e:
        fits({"kind": "skip_layers", "layers": [9]}, {"kind": "prune_heads", "heads": {"0": [7]}})
    assert len(e.value.problems) == 2 and e.value.plan_id == "p-1"


@pytest.mark.parametrize("facts, message", [
    ({"num_layers": 0, "num_heads": 2}, "model.num_layers: expected an int > 0, got 0"),
    ({"num_layers": 2, "num_heads": True}, "model.num_heads: expected an int > 0, got True"),
    ({"num_layers": 2, "num_heads": 2, "depth": 1}, "model: unknown field(s) depth"),
    ({"num_layers": 2, "num_heads": 2, "dtype": ""}, "model.dtype: expected a dtype name"),
])
def test_model_facts_validation(facts, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelFacts.from_dict(facts)
    assert ModelFacts.of({"num_layers": 1, "num_heads": 1}) == ModelFacts(1, 1, "float32")


@pytest.mark.parametrize("dtype, layers, problem", [
    ("float32", {"0": "fp32_packed", "lm_head": "fp32_packed"}, None),
    ("bfloat16", {"0": "int8", "lm_head": "int8"}, None),
    ("bfloat16", {"0": "fp32_packed", "1": "int8"}, "0"),
    ("float16", {"0": "int8", "lm_head": "fp32_packed"}, "lm_head"),
])
def test_fp32_packed_needs_fp32_weights(dtype, layers, problem):
    facts = ModelFacts(num_layers=4, num_heads=3, dtype=dtype)
    t = {"kind": "weight_precision", "layers": layers}
    if problem is None:
        assert fits(t, facts=facts) == []
    else:
        assert refused(t, facts=facts) == [
            f"plan.transforms[0].layers: fp32_packed on {problem} needs fp32 weights; the "
            f"model's are {dtype}"]


def test_fp32_packed_in_a_draft_plan_is_checked_too():
    draft = {"kind": "execution", "static_kv_cache": False, "compile": "none", "speculative": {
        "draft": "self", "k": 4, "draft_plan": {"transforms": [
            {"kind": "weight_precision", "layers": {"2": "fp32_packed"}}]}}}
    assert refused(draft, facts=ModelFacts(4, 3, "bfloat16")) == [
        "plan.transforms[0].speculative.draft_plan.transforms[0].layers: fp32_packed on 2 "
        "needs fp32 weights; the model's are bfloat16"]
