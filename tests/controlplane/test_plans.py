import copy
import hashlib
import json
import threading

import duckdb
import pytest

from headroom_sidecar.controlplane.plans import (TRANSITIONS, ActivationSparsity, ApplicationState, CompileMode,
                                Decision, DecisionOutcome, Execution, IllegalTransition, PlanDoc,
                                PlanMode, PlanStatus, PlanStore, PlanValidationError, Precision,
                                PruneHeads, RolloutStage, SkipLayers, WeightPrecision,
                                check_against, layer_ranges, plan_diff, plan_hash)

FP = "ab" * 32
FACTS = {"num_layers": 30, "num_heads": 9, "dtype": "float32"}


def doc(**over) -> dict:
    d = {"schema": "headroom.plan/v1", "plan_id": "p-1", "version": 1, "model_fingerprint": FP,
         "query_classes": ["code"], "mode": "structural",
         "transforms": [
             {"kind": "prune_heads", "heads": {"3": [0, 5]}},
             {"kind": "skip_layers", "layers": [12]},
             {"kind": "activation_sparsity", "thresholds": {"4": 0.05}},
             {"kind": "weight_precision", "layers": {str(i): "int8" for i in range(30) if i != 12}},
             {"kind": "execution", "static_kv_cache": True, "compile": "torch_compile"}],
         "notes": "hand-written"}
    d.update(over)
    return d


@pytest.fixture
def store(tmp_path):
    con = duckdb.connect(str(tmp_path / "plans.duckdb"))
    yield PlanStore(con, threading.Lock())
    con.close()


# ---------------------------------------------------------------- documents and hashes

def test_hash_is_sha256_of_canonical_json_and_key_order_free():
    d = doc()
    shuffled = json.loads(json.dumps(d))
    shuffled = dict(reversed(list(shuffled.items())))
    shuffled["transforms"][0] = dict(reversed(list(shuffled["transforms"][0].items())))
    expected = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest()
    assert plan_hash(d) == plan_hash(shuffled) == expected
    assert plan_hash(doc(notes="other")) != expected


def test_hash_uses_utf8_not_ascii_escapes():
    d = doc(notes="café")
    assert plan_hash(d) == hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":"),
                                                     ensure_ascii=False).encode("utf-8")).hexdigest()
    assert plan_hash(d) != hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_round_trip_normalises_order():
    d = doc()
    d["transforms"][0]["heads"]["3"] = [5, 0]
    plan = PlanDoc.from_doc(d)
    assert plan.transform(PruneHeads.kind).heads == {3: (0, 5)}
    assert PlanDoc.from_doc(plan.to_doc()) == plan
    # Same meaning, different listing order: same normalised hash.
    d2 = doc()
    d2["transforms"] = list(reversed(d2["transforms"]))
    assert PlanDoc.from_doc(d2).sha256 == plan.sha256


def test_built_in_code_equals_parsed():
    built = PlanDoc("p-1", 1, FP, (
        Execution(True, CompileMode.TORCH_COMPILE), SkipLayers((12,)),
        PruneHeads({3: (5, 0)}), ActivationSparsity({4: 0.05}),
        WeightPrecision({i: Precision.INT8 for i in range(30) if i != 12})),
        query_classes=("code",), notes="hand-written")
    assert built.to_doc() == PlanDoc.from_doc(doc()).to_doc()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("plan_id"), "plan_id"),
    (lambda d: d.update(schema="headroom.plan/v0"), "schema"),
    (lambda d: d.update(version=0), "version"),
    (lambda d: d.update(version=True), "version"),
    (lambda d: d.update(model_fingerprint="ABC"), "model_fingerprint"),
    (lambda d: d.update(mode="sometimes"), "mode"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d.update(query_classes=["a", ""]), "query_classes[1]"),
    (lambda d: d.update(plan_id="bad id!"), "plan_id"),
    (lambda d: d["transforms"].append({"kind": "skip_layers", "layers": [1]}), "transforms[5].kind"),
    (lambda d: d["transforms"][1].update(kind="teleport"), "transforms[1].kind"),
    (lambda d: d["transforms"][0]["heads"].update({"x": [1]}), "transforms[0].heads"),
    (lambda d: d["transforms"][0]["heads"].update({"4": [1, -1]}), "transforms[0].heads.4[1]"),
    (lambda d: d["transforms"][0]["heads"].update({"4": []}), "transforms[0].heads.4"),
    (lambda d: d["transforms"][1].update(layers=[2, 2]), "transforms[1].layers"),
    (lambda d: d["transforms"][2]["thresholds"].update({"4": -0.1}), "transforms[2].thresholds.4"),
    (lambda d: d["transforms"][2]["thresholds"].update({"4": float("inf")}), "transforms[2].thresholds.4"),
    (lambda d: d["transforms"][3]["layers"].update({"0": "int3"}), "transforms[3].layers.0"),
    (lambda d: d["transforms"][3]["layers"].update({"lm_head": "int4"}), "transforms[3].layers.lm_head"),
    (lambda d: d["transforms"][3]["layers"].update({"lm_head": None}), "transforms[3].layers.lm_head"),
    (lambda d: d["transforms"][3]["layers"].update({"head": "int8"}), "transforms[3].layers"),
    (lambda d: d["transforms"][2]["thresholds"].update({"lm_head": 0.1}), "transforms[2].thresholds"),
    (lambda d: d["transforms"][4].update(static_kv_cache="yes"), "transforms[4].static_kv_cache"),
    (lambda d: d["transforms"][4].update(static_kv_cache=False), "transforms[4].compile"),
    (lambda d: d["transforms"][4].pop("compile"), "transforms[4].compile"),
    (lambda d: d.update(mode="dynamic"), "transforms[0].kind"),
])
def test_validation_errors_name_the_field(mutate, field):
    d = copy.deepcopy(doc())
    mutate(d)
    with pytest.raises(PlanValidationError) as e:
        PlanDoc.from_doc(d)
    assert e.value.path == field
    assert str(e.value).startswith(field + ":")


def test_bad_layer_key_names_the_head_key():
    d = doc(transforms=[{"kind": "weight_precision", "layers": {"LM_HEAD": "int8"}}])
    with pytest.raises(PlanValidationError, match="like \"3\" or 'lm_head', got 'LM_HEAD'"):
        PlanDoc.from_doc(d)


HEAD_DOC = {"kind": "weight_precision", "layers": {"3": "int8", "lm_head": "int8", "1": "int8"}}


def test_head_precision_round_trip():
    plan = PlanDoc.from_doc(doc(transforms=[HEAD_DOC]))
    wp = plan.transform(WeightPrecision.kind)
    assert wp.precisions == {1: Precision.INT8, 3: Precision.INT8} and wp.head == Precision.INT8
    assert wp.layers() == {1, 3}                       # blocks only
    written = plan.to_doc()["transforms"][0]
    assert written == {"kind": "weight_precision",
                       "layers": {"1": "int8", "3": "int8", "lm_head": "int8"}}
    assert PlanDoc.from_doc(plan.to_doc()) == plan
    built = PlanDoc("p-1", 1, FP, (WeightPrecision({3: Precision.INT8, 1: Precision.INT8},
                                                   Precision.INT8),), query_classes=("code",),
                    notes="hand-written")
    assert built.sha256 == plan.sha256 == plan_hash(plan.to_doc())
    head_only = PlanDoc("p-2", 1, FP, (WeightPrecision({}, Precision.INT8),))
    assert head_only.to_doc()["transforms"] == [{"kind": "weight_precision",
                                                 "layers": {"lm_head": "int8"}}]
    no_head = PlanDoc.from_doc(doc(transforms=[{"kind": "weight_precision", "layers": {"1": "int8"}}]))
    assert no_head.transform(WeightPrecision.kind).head is None
    assert "lm_head" not in no_head.to_doc()["transforms"][0]["layers"]


def test_head_precision_fits_any_model_and_agent_parses_it():
    from headroom_sidecar.agent.plan import Plan    # tests may import agent/: both sides read the same document
    plan = PlanDoc.from_doc(doc(transforms=[HEAD_DOC]))
    check_against(plan, {"num_layers": 4, "num_heads": 2})
    agent = Plan.from_doc(plan.to_doc())
    assert agent.hash == plan.sha256
    wp = agent.get(WeightPrecision.kind)
    assert wp.layers == {1: Precision.INT8, 3: Precision.INT8} and wp.head == Precision.INT8


def test_dynamic_plan_with_thresholds_only_is_valid():
    d = doc(mode="dynamic", transforms=[{"kind": "activation_sparsity", "thresholds": {"1": 0.01}}])
    assert PlanDoc.from_doc(d).mode == PlanMode.DYNAMIC


@pytest.mark.parametrize("transform, path", [
    ({"kind": "skip_layers", "layers": [30]}, "transforms[0]"),
    ({"kind": "prune_heads", "heads": {"2": [9]}}, "transforms[0].heads.2"),
    ({"kind": "prune_heads", "heads": {"2": list(range(9))}}, "transforms[0].heads.2"),
])
def test_check_against_the_model(transform, path):
    plan = PlanDoc.from_doc(doc(transforms=[transform]))
    with pytest.raises(PlanValidationError) as e:
        check_against(plan, FACTS)
    assert e.value.path == path


# ---------------------------------------------------------------- diff

def test_plan_diff_lines():
    assert plan_diff(doc(), FACTS) == [
        "scope: structural, query classes: code",
        "layers 0-11, 13-29: weights fp32 -> int8",
        "layer 4 MLP: activations |a| < 0.05 zeroed",
        "layer 3 attention: 9 -> 7 heads (removed 0, 5)",
        "layer 12: skipped",
        "execution: static KV cache, torch.compile",
    ]


@pytest.mark.parametrize("transforms, expected", [
    ([], ["no changes: runs the unoptimised model"]),
    ([{"kind": "weight_precision", "layers": {"7": "int8"}}], ["layer 7: weights bf16 -> int8"]),
    ([{"kind": "weight_precision", "layers": {"lm_head": "int8"}}], ["lm_head: weights bf16 -> int8"]),
    ([HEAD_DOC], ["layers 1, 3: weights bf16 -> int8", "lm_head: weights bf16 -> int8"]),
    ([{"kind": "execution", "static_kv_cache": True, "compile": "cuda_graph"}],
     ["execution: static KV cache, CUDA graphs"]),
    ([{"kind": "execution", "static_kv_cache": False, "compile": "none"}], ["execution: unchanged"]),
    ([{"kind": "skip_layers", "layers": [5, 3]}], ["layer 3: skipped", "layer 5: skipped"]),
])
def test_plan_diff_cases(transforms, expected):
    lines = plan_diff(doc(transforms=transforms, query_classes=[]), {**FACTS, "dtype": "bfloat16"})
    assert lines == ["scope: structural, query classes: all"] + expected


@pytest.mark.parametrize("layers, text", [([], ""), ([4], "4"), ([0, 1, 2, 5, 7, 8], "0-2, 5, 7-8")])
def test_layer_ranges(layers, text):
    assert layer_ranges(layers) == text


# ---------------------------------------------------------------- store

def test_add_get_list(store):
    a = store.add(doc(), "planner")
    assert a.status == PlanStatus.PROPOSED and a.sha256 == PlanDoc.from_doc(doc()).sha256
    assert store.get("p-1").doc == PlanDoc.from_doc(doc()).to_doc()
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
    store.record_decision(Decision("p-1", DecisionOutcome.APPROVE, [{"rule": "top1", "ok": True}],
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
    assert h.decisions[0].outcome == DecisionOutcome.APPROVE and h.decisions[0].policy_revision == "rev-7"
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
