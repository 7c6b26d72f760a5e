"""The agent's side of plans: the hash of the document as received, and fit to the loaded model
(fingerprint, supported kinds, the output head). The document rules themselves: tests/proto/."""
from __future__ import annotations

import json

import pytest
import torch

from headroom_sidecar.agent.executor.int8 import head_int8_support
from headroom_sidecar.agent.plan import check_fit
from headroom_sidecar.proto.plan import (HEAD_KEY, PLAN_SCHEMA as SCHEMA, Plan, PlanError, Precision,
                                         TransformKind, canonical_json, plan_hash)
from tests.agent.executor import plan_doc, rig
from tests.builders import tiny_llama, tiny_plain

FP = "a" * 64


def _doc(**over):
    d = plan_doc(FP, {"kind": "skip_layers", "layers": [1]},
                 {"kind": "prune_heads", "heads": {"0": [1, 0]}})
    d.update(over)
    return d


def test_hash_is_key_order_independent_and_stable():
    d = _doc(notes="héllo ✓")
    shuffled = json.loads(json.dumps(dict(reversed(list(d.items())))))
    assert plan_hash(d) == plan_hash(shuffled) == Plan.from_doc(shuffled).hash
    # the rule the control plane uses, spelled out
    expected = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical_json(d) == expected and "héllo ✓".encode() in expected
    assert Plan.from_json(Plan.from_doc(d).to_json()).hash == plan_hash(d)


def test_hash_changes_with_content():
    assert plan_hash(_doc()) != plan_hash(_doc(version=2))


def test_parsed_form():
    p = Plan.from_doc(_doc())
    assert [t.kind for t in p.ordered()] == [TransformKind.SKIP_LAYERS, TransformKind.PRUNE_HEADS]
    assert p.get(TransformKind.PRUNE_HEADS).heads == {0: (0, 1)}


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(schema="x/v0"), "plan.schema: must be"),
    (lambda d: d.pop("plan_id"), "plan.plan_id: is required (missing field)"),
    (lambda d: d.update(extra=1), "plan.extra: unknown field"),
    (lambda d: d.update(version=0), "version"),
    (lambda d: d.update(model_fingerprint="XYZ"), "model_fingerprint"),
    (lambda d: d.update(mode="fast"), "plan.mode: must be one of 'structural', 'dynamic', got 'fast'"),
    (lambda d: d["transforms"].append({"kind": "quantum"}), "plan.transforms[2].kind: must be one of"),
    (lambda d: d["transforms"][1].update(head=1), "plan.transforms[1].head: unknown field"),
    (lambda d: d["transforms"].append({"kind": "skip_layers", "layers": [2]}), "duplicate kind"),
    (lambda d: d["transforms"][0].update(layers=[1, 1]), "plan.transforms[0].layers: duplicate layer indices [1]"),
    (lambda d: d["transforms"].append({"kind": "activation_sparsity", "thresholds": {"0": -1}}),
     "plan.transforms[2].thresholds.0: must be a finite number >= 0"),
    (lambda d: d["transforms"].append({"kind": "weight_precision", "layers": {"x": "int8"}}),
     "layer key must be a decimal string like \"3\" or 'lm_head', got 'x'"),
    (lambda d: d["transforms"].append({"kind": "weight_precision", "layers": {"0": "int3"}}),
     "plan.transforms[2].layers.0: must be one of 'int8', 'fp32_packed', got 'int3'"),
    (lambda d: d["transforms"].append({"kind": "weight_precision", "layers": {"lm_head": "int4"}}),
     "plan.transforms[2].layers.lm_head: must be one of 'int8', 'fp32_packed', got 'int4'"),
    (lambda d: d["transforms"].append({"kind": "weight_precision", "layers": {"lm_head": None}}),
     "plan.transforms[2].layers.lm_head: must be one of 'int8', 'fp32_packed', got None"),
    (lambda d: d["transforms"].append({"kind": "weight_precision", "layers": {"LM_HEAD": "int8"}}),
     "plan.transforms[2].layers: layer key must be a decimal string like \"3\" or 'lm_head', got 'LM_HEAD'"),
    (lambda d: d["transforms"].append({"kind": "weight_precision", "layers": {"embeddings": "int8"}}),
     "got 'embeddings'"),
    (lambda d: d["transforms"].append({"kind": "activation_sparsity", "thresholds": {"lm_head": 1}}),
     "plan.transforms[2].thresholds: layer key must be a decimal string like \"3\", got 'lm_head'"),
    (lambda d: d["transforms"].append({"kind": "execution", "static_kv_cache": False,
                                       "compile": "cuda_graph"}), "needs static_kv_cache"),
    (lambda d: d["transforms"][1].update(heads={"0": [1, 1]}), "plan.transforms[1].heads.0: duplicate head indices [1]"),
])
def test_schema_errors_name_the_place(mutate, needle):
    d = _doc()
    mutate(d)
    with pytest.raises(PlanError) as err:
        Plan.from_doc(d)
    assert any(needle in p for p in err.value.problems), err.value.problems


def test_all_schema_problems_reported_at_once():
    d = _doc(schema="bad", version=-1, surprise=True)
    d["transforms"].append({"kind": "nope"})
    with pytest.raises(PlanError) as err:
        Plan.from_doc(d)
    assert len(err.value.problems) == 4


def test_not_json():
    with pytest.raises(PlanError, match="line 1"):
        Plan.from_json("{nope")


def test_fit_notes_skip_and_prune_same_layer():
    r = rig(tiny_llama())
    p = Plan.from_doc(plan_doc(r.fingerprint, {"kind": "skip_layers", "layers": [1]},
                               {"kind": "prune_heads", "heads": {"1": [0], "0": [0, 1, 2, 3]}}))
    notes = check_fit(p, r.structure, r.fingerprint)
    assert any("[1] are skipped" in n for n in notes)
    assert any("heads.0: all 4 heads pruned" in n for n in notes)


def _head_plan(fp: str = FP, layers: dict | None = None):
    return Plan.from_doc(plan_doc(fp, {"kind": "skip_layers", "layers": [1]},
                                  {"kind": "weight_precision",
                                   "layers": layers or {"2": "int8", "lm_head": "int8"}}))


def test_head_key_parses_into_its_own_field():
    assert HEAD_KEY == "lm_head"
    p = _head_plan()
    wp = p.get(TransformKind.WEIGHT_PRECISION)
    assert wp.layers == {2: Precision.INT8} and wp.head == Precision.INT8
    assert Plan.from_doc(plan_doc(FP, {"kind": "weight_precision", "layers": {"2": "int8"}})) \
        .get(TransformKind.WEIGHT_PRECISION).head is None
    # the document keeps the key as sent, so the hash rule is the one the control plane uses
    assert p.doc["transforms"][1]["layers"] == {"2": "int8", "lm_head": "int8"}
    assert p.hash == plan_hash(p.doc) and Plan.from_json(p.to_json()).hash == p.hash


def test_fit_accepts_head_when_the_model_has_a_linear_head():
    r = rig(tiny_llama())
    assert head_int8_support(r.model) is None
    p = _head_plan(r.fingerprint, {"lm_head": "int8"})
    assert check_fit(p, r.structure, r.fingerprint, head_reason=None) == []


@pytest.mark.parametrize("case", ["plain", "non-linear-head", "unchecked"])
def test_fit_refuses_head_it_cannot_quantise(case):
    if case == "plain":
        model, why = tiny_plain(), "PlainTransformer has no get_output_embeddings()"
    else:
        model, why = tiny_llama(), "no model was given"
    if case == "non-linear-head":
        model.lm_head = torch.nn.Sequential(model.lm_head)
        why = "the output head is Sequential, not nn.Linear"
    r = rig(model)
    # without head_reason, check_fit has no model to look at: it refuses rather than guess
    head = {} if case == "unchecked" else {"head_reason": head_int8_support(model)}
    p = _head_plan(r.fingerprint)
    with pytest.raises(PlanError) as err:
        check_fit(p, r.structure, r.fingerprint, **head)
    (problem,) = err.value.problems
    # index 0 in the normal form (weight_precision sorts before skip_layers)
    assert problem.startswith("plan.transforms[0].layers.lm_head: cannot set the "
                              "output head to int8: ") and why in problem, problem
    # blocks-only precision on the same model still fits
    blocks_only = _head_plan(r.fingerprint, {"2": "int8"})
    assert check_fit(blocks_only, r.structure, r.fingerprint, **head) == []


def test_head_is_not_a_layer_index():
    r = rig(tiny_llama(layers=2))
    p = _head_plan(r.fingerprint, {"lm_head": "int8"})      # 2 layers; no index 'lm_head' to range-check
    assert check_fit(p, r.structure, r.fingerprint, head_reason=None) == []


def test_schema_constant():
    assert SCHEMA == "headroom.plan/v1"
