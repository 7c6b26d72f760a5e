"""The one plan model: round trip, the normal form and its hash, and every rule of the parser
with the path its error names. (Moved here from the control plane's and the agent's tests.)"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from headroom_sidecar.proto.plan import (ActivationSparsity, CompileMode, Execution, Plan,
                                         PlanError, PlanMode, Precision, PruneHeads, SkipLayers,
                                         Speculative, SpeculativeDraft, TransformKind,
                                         WeightPrecision, parse_plan, plan_from_json, plan_hash,
                                         replace)
from tests.proto.plandocs import FP, doc


SPEC = {"kind": "execution", "static_kv_cache": False, "compile": "none",
        "speculative": {"draft": "self", "k": 4, "draft_plan": {"transforms": [
            {"kind": "weight_precision", "layers": {"1": "int8"}},
            {"kind": "skip_layers", "layers": [3]}]}}}


# ---------------------------------------------------------------- documents and hashes

def test_hash_is_sha256_of_canonical_json_and_key_order_free():
    d = doc(notes="café")
    shuffled = dict(reversed(list(json.loads(json.dumps(d)).items())))
    shuffled["transforms"][0] = dict(reversed(list(shuffled["transforms"][0].items())))
    expected = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode("utf-8")).hexdigest()
    assert plan_hash(d) == plan_hash(shuffled) == expected == parse_plan(shuffled).hash
    assert plan_hash(doc(notes="other")) != expected


def test_round_trip_every_field():
    d = doc(query_classes=["chat", "code"], transforms=doc()["transforms"][:4] + [copy.deepcopy(SPEC)])
    d["transforms"][3]["layers"]["lm_head"] = "int8"
    plan = parse_plan(d)
    assert parse_plan(plan.to_doc()) == plan and plan.to_doc() == parse_plan(plan.to_doc()).to_doc()
    assert plan.query_classes == ("chat", "code") and plan.notes == "hand-written"
    spec = plan.get(TransformKind.EXECUTION).speculative
    # in memory the draft plan is in the executor's order; in the document in kind order
    assert [t.kind for t in spec.draft_transforms] == [TransformKind.SKIP_LAYERS,
                                                       TransformKind.WEIGHT_PRECISION]
    assert [t["kind"] for t in plan.to_doc()["transforms"][4]["speculative"]["draft_plan"]
            ["transforms"]] == ["weight_precision", "skip_layers"]


def test_normal_form_hash_is_unchanged_from_the_old_control_plane_parser():
    # Computed with controlplane/plans.py PlanDoc before the parsers were merged: stored plans
    # keep their sha256 (a change here re-identifies every plan in every store).
    d = doc(query_classes=["code", "chat"], notes="n", transforms=[
        copy.deepcopy(SPEC), {"kind": "prune_heads", "heads": {"3": [5, 0]}},
        {"kind": "skip_layers", "layers": [12]},
        {"kind": "activation_sparsity", "thresholds": {"4": 0.05, "2": 1}},
        {"kind": "weight_precision", "layers": {"lm_head": "int8", "7": "int8", "0": "int8"}}])
    d["transforms"][0]["speculative"]["draft_plan"]["transforms"].reverse()
    assert parse_plan(d).sha256 == "3b26a31a7dbe675c4d994fa681a6471961cb7ff8c131c4a9fbe554bfd4dee126"


def test_two_hashes_received_and_normal_form():
    d = doc()
    d["transforms"].reverse()
    plan = parse_plan(d)
    assert plan.hash == plan_hash(d) != plan.sha256 == plan_hash(plan.to_doc())
    assert plan.doc == d and plan_from_json(plan.to_json()).hash == plan.hash
    normal = parse_plan(plan.to_doc())
    assert normal.hash == normal.sha256 == plan.sha256 and normal == plan


def test_built_in_code_equals_parsed_and_is_validated():
    built = Plan("p-1", 1, FP, (
        Execution(True, CompileMode.TORCH_COMPILE), SkipLayers((12,)),
        PruneHeads({3: (5, 0)}), ActivationSparsity({4: 0.05}),
        WeightPrecision({i: Precision.INT8 for i in range(30) if i != 12})),
        query_classes=("code",), notes="hand-written")
    assert built == parse_plan(doc()) and built.to_doc() == parse_plan(doc()).to_doc()
    assert built.hash == built.sha256 and built.source is None
    with pytest.raises(PlanError, match=r"^plan.transforms\[0\].layers: duplicate layer"):
        Plan("p-1", 1, FP, (SkipLayers((1, 1)),))
    with pytest.raises(PlanError, match=r"^plan.version: must be an integer >= 1, got 0"):
        replace(built, version=0)
    with pytest.raises(PlanError, match="cannot be written as a document"):
        Plan("p-1", 1, FP, (WeightPrecision({0: "int4"}),))


def test_not_json():
    with pytest.raises(PlanError, match="^plan: not JSON: line 1"):
        plan_from_json("{nope")


# ---------------------------------------------------------------- every field's error names its path

@pytest.mark.parametrize("mutate, path", [
    (lambda d: d.pop("plan_id"), "plan.plan_id"),
    (lambda d: d.update(schema="headroom.plan/v0"), "plan.schema"),
    (lambda d: d.update(version=0), "plan.version"),
    (lambda d: d.update(version=True), "plan.version"),
    (lambda d: d.update(model_fingerprint="ABC"), "plan.model_fingerprint"),
    (lambda d: d.update(mode="sometimes"), "plan.mode"),
    (lambda d: d.update(colour="red"), "plan.colour"),
    (lambda d: d.update(notes=3), "plan.notes"),
    (lambda d: d.update(transforms={}), "plan.transforms"),
    (lambda d: d.update(plan_id="bad id!"), "plan.plan_id"),
    (lambda d: d["transforms"].append({"kind": "skip_layers", "layers": [1]}), "plan.transforms[5].kind"),
    (lambda d: d["transforms"].append("skip"), "plan.transforms[5]"),
    (lambda d: d["transforms"].append({"layers": [1]}), "plan.transforms[5].kind"),
    (lambda d: d["transforms"][1].update(kind="teleport"), "plan.transforms[1].kind"),
    (lambda d: d["transforms"][1].update(extra=1), "plan.transforms[1].extra"),
    (lambda d: d["transforms"][1].pop("layers"), "plan.transforms[1].layers"),
    (lambda d: d["transforms"][0]["heads"].update({"x": [1]}), "plan.transforms[0].heads"),
    (lambda d: d["transforms"][0]["heads"].update({"04": [1]}), "plan.transforms[0].heads"),
    (lambda d: d["transforms"][0]["heads"].update({"4": [1, -1]}), "plan.transforms[0].heads.4[1]"),
    (lambda d: d["transforms"][0]["heads"].update({"4": []}), "plan.transforms[0].heads.4"),
    (lambda d: d["transforms"][0]["heads"].update({"4": [2, 2]}), "plan.transforms[0].heads.4"),
    (lambda d: d["transforms"][0].update(heads=[1]), "plan.transforms[0].heads"),
    (lambda d: d["transforms"][1].update(layers=[2, 2]), "plan.transforms[1].layers"),
    (lambda d: d["transforms"][1].update(layers=[True]), "plan.transforms[1].layers[0]"),
    (lambda d: d["transforms"][2]["thresholds"].update({"4": -0.1}), "plan.transforms[2].thresholds.4"),
    (lambda d: d["transforms"][2]["thresholds"].update({"4": float("inf")}), "plan.transforms[2].thresholds.4"),
    (lambda d: d["transforms"][2]["thresholds"].update({"4": "0.1"}), "plan.transforms[2].thresholds.4"),
    (lambda d: d["transforms"][2]["thresholds"].update({"lm_head": 0.1}), "plan.transforms[2].thresholds"),
    (lambda d: d["transforms"][3]["layers"].update({"0": "int3"}), "plan.transforms[3].layers.0"),
    (lambda d: d["transforms"][3]["layers"].update({"lm_head": None}), "plan.transforms[3].layers.lm_head"),
    (lambda d: d["transforms"][3]["layers"].update({"head": "int8"}), "plan.transforms[3].layers"),
    (lambda d: d["transforms"][3]["layers"].update({"embeddings": "int8"}), "plan.transforms[3].layers"),
    (lambda d: d["transforms"][4].update(static_kv_cache="yes"), "plan.transforms[4].static_kv_cache"),
    (lambda d: d["transforms"][4].update(static_kv_cache=False), "plan.transforms[4].compile"),
    (lambda d: d["transforms"][4].update(compile="jit"), "plan.transforms[4].compile"),
    (lambda d: d.update(mode="dynamic"), "plan.transforms[0].kind"),
])
def test_errors_name_the_field(mutate, path):
    d = copy.deepcopy(doc())
    mutate(d)
    with pytest.raises(PlanError) as e:
        parse_plan(d)
    assert e.value.path == path, e.value.problems
    assert str(e.value).startswith(path + ": ")


@pytest.mark.parametrize("mutate, path", [
    (lambda s: s.update(k=0), "speculative.k"),
    (lambda s: s.update(k=17), "speculative.k"),
    (lambda s: s.update(draft="oracle"), "speculative.draft"),
    (lambda s: s.update(extra=1), "speculative.extra"),
    (lambda s: s.pop("draft_plan"), "speculative.draft_plan"),
    (lambda s: s.update(draft="prompt_lookup"), "speculative.draft_plan"),
    (lambda s: s.update(draft_plan={"transforms": []}), "speculative.draft_plan.transforms"),
    (lambda s: s.update(draft_plan={"transforms": [SPEC]}), "speculative.draft_plan.transforms[0].kind"),
    (lambda s: s["draft_plan"]["transforms"].append({"kind": "skip_layers", "layers": [2]}),
     "speculative.draft_plan.transforms[2].kind"),
    (lambda s: s["draft_plan"]["transforms"][1].update(layers=[-1]),
     "speculative.draft_plan.transforms[1].layers[0]"),
])
def test_speculative_errors_name_the_field(mutate, path):
    d = doc(transforms=[copy.deepcopy(SPEC)])
    mutate(d["transforms"][0]["speculative"])
    with pytest.raises(PlanError) as e:
        parse_plan(d)
    assert e.value.path == "plan.transforms[0]." + path, e.value.problems


def test_speculative_k_boundaries_and_settings():
    for k in (1, 16):
        d = doc(transforms=[copy.deepcopy(SPEC)])
        d["transforms"][0]["speculative"]["k"] = k
        assert parse_plan(d).get(TransformKind.EXECUTION).speculative.k == k
    d = doc(transforms=[{**copy.deepcopy(SPEC), "static_kv_cache": True}])
    with pytest.raises(PlanError) as e:
        parse_plan(d)
    assert e.value.path == "plan.transforms[0].speculative"


def test_every_problem_is_reported_at_once():
    d = doc(schema="bad", version=-1, surprise=True)
    d["transforms"].append({"kind": "nope"})
    with pytest.raises(PlanError) as e:
        parse_plan(d)
    assert [p.split(": ")[0] for p in e.value.problems] == [
        "plan.surprise", "plan.schema", "plan.version", "plan.transforms[5].kind"]


def test_where_prefixes_every_path():
    with pytest.raises(PlanError, match=r"^policies/tests/a.yaml: case 3 plan.mode: "):
        parse_plan(doc(mode="x"), where="policies/tests/a.yaml: case 3 plan")
    with pytest.raises(PlanError, match="^plan: must be an object, got list"):
        parse_plan([])


# ---------------------------------------------------------------- decisions (the disagreements)

@pytest.mark.parametrize("where", ["0", "lm_head"])
def test_int4_is_not_in_the_vocabulary(where):
    d = doc(transforms=[{"kind": "weight_precision", "layers": {where: "int4"}}])
    with pytest.raises(PlanError) as e:
        parse_plan(d)
    assert e.value.problems == [f"plan.transforms[0].layers.{where}: must be one of 'int8', "
                                "'fp32_packed', got 'int4'"]
    assert [p.value for p in Precision] == ["int8", "fp32_packed"]


@pytest.mark.parametrize("missing", ["compile", "static_kv_cache"])
def test_execution_settings_are_required_no_default(missing):
    t = {"kind": "execution", "static_kv_cache": False, "compile": "none"}
    assert parse_plan(doc(transforms=[t])).get(TransformKind.EXECUTION) == Execution(False, CompileMode.NONE)
    t.pop(missing)
    with pytest.raises(PlanError) as e:
        parse_plan(doc(transforms=[t]))
    assert e.value.problems == [f"plan.transforms[0].{missing}: is required (missing field)"]


def test_threshold_zero_is_the_boundary():
    t = {"kind": "activation_sparsity", "thresholds": {"1": 0}}
    assert parse_plan(doc(transforms=[t])).get(TransformKind.ACTIVATION_SPARSITY).thresholds == {1: 0.0}
    t["thresholds"]["1"] = -1e-12
    with pytest.raises(PlanError, match=r"thresholds.1: must be a finite number >= 0"):
        parse_plan(doc(transforms=[t]))


def test_dynamic_mode_allows_thresholds_only():
    d = doc(mode="dynamic", transforms=[{"kind": "activation_sparsity", "thresholds": {"1": 0.01}}])
    assert parse_plan(d).mode == PlanMode.DYNAMIC


# ---------------------------------------------------------------- query_classes (the plan's scope)

@pytest.mark.parametrize("classes, expected", [
    ([], ()), (["code"], ("code",)), (["code", "chat"], ("chat", "code")),
])
def test_query_classes_parse_sorted_and_round_trip(classes, expected):
    plan = parse_plan(doc(query_classes=classes))
    assert plan.query_classes == expected
    assert plan.to_doc()["query_classes"] == list(expected)
    assert parse_plan(plan.to_doc()) == plan
    assert parse_plan({k: v for k, v in doc().items() if k != "query_classes"}).query_classes == ()


@pytest.mark.parametrize("classes, path, needle", [
    (["a", ""], "plan.query_classes[1]", "must be a non-empty string, got ''"),
    (["a", 3], "plan.query_classes[1]", "must be a non-empty string, got 3"),
    (["a", "b", "a"], "plan.query_classes", "query class(es) ['a'] listed twice"),
    ("code", "plan.query_classes", "must be a list of query class names, got str"),
])
def test_query_classes_validation(classes, path, needle):
    with pytest.raises(PlanError) as e:
        parse_plan(doc(query_classes=classes))
    assert e.value.problems == [f"{path}: {needle}"]
    with pytest.raises(PlanError):
        Plan("p-1", 1, FP, query_classes=tuple(classes) if isinstance(classes, list) else classes)


def test_head_precision_round_trip():
    t = {"kind": "weight_precision", "layers": {"3": "int8", "lm_head": "int8", "1": "int8"}}
    plan = parse_plan(doc(transforms=[t]))
    wp = plan.get(WeightPrecision.kind)
    assert wp.layers == {1: Precision.INT8, 3: Precision.INT8} and wp.head == Precision.INT8
    assert wp.touched_layers() == {1, 3}                      # blocks only
    assert plan.to_doc()["transforms"][0] == {
        "kind": "weight_precision", "layers": {"1": "int8", "3": "int8", "lm_head": "int8"}}
    head_only = Plan("p-2", 1, FP, (WeightPrecision({}, Precision.INT8),))
    assert head_only.to_doc()["transforms"] == [{"kind": "weight_precision",
                                                 "layers": {"lm_head": "int8"}}]
    no_head = parse_plan(doc(transforms=[{"kind": "weight_precision", "layers": {"1": "int8"}}]))
    assert no_head.get(WeightPrecision.kind).head is None


def test_speculative_model():
    spec = Speculative(SpeculativeDraft.PROMPT_LOOKUP, 3)
    plan = Plan("p-s", 1, FP, (Execution(False, CompileMode.NONE, spec),))
    assert plan.to_doc()["transforms"][0]["speculative"] == {"draft": "prompt_lookup", "k": 3}
    assert parse_plan(plan.to_doc()) == plan
