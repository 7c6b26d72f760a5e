"""The search against a synthetic quality model: every change costs a known amount of top-1
agreement, so the plan that fits the budget is known in advance."""
import dataclasses
import math

import pytest

from headroom_sidecar.proto.plan import Plan, PlanMode, TransformKind
from headroom_sidecar.controlplane.planner.candidates import (Candidates, HeadCandidate, LadderStep, LayerCandidate,
                                             SparseLayerCandidate)
from headroom_sidecar.controlplane.planner.search import (Phase, Planner, PlanTarget, QualityBudget, TrialError,
                                         TrialRecord, choose_best)
from headroom_sidecar.controlplane.policy.schema import Objective
from headroom_sidecar.controlplane.planner.settings import PlannerSettings

FP = "0f" * 32
BUDGET = QualityBudget(min_top1=0.97, max_ppl_ratio=1.01, max_mean_kl=0.02)
TARGET = PlanTarget(model_fingerprint=FP, plan_id_prefix="run1", query_classes=("code",))


def settings_(**kw) -> PlannerSettings:
    """Planner settings for the search tests: no execution or fp32_packed trial unless a test
    asks for it."""
    return PlannerSettings(**{"compiled_decode": False, "fp32_packed": False, **kw})


SETTINGS = settings_(max_trials=40)

# Costs in top-1 agreement. Skipping a layer costs SKIP_COST and makes its other changes moot.
INT8_COST = 0.0001
HEAD_INT8_COST = 0.0002                   # int8 on the output head (lm_head)
SPARSITY_COST = {2: 0.05, 1: 0.03}        # per unit of threshold
HEAD_COST = 0.1                           # per unit of out_share
SKIP_COST = {3: 0.0005, 1: 0.01, 4: 0.0002, 2: 0.05, 0: 0.0, 5: 0.0}
SHARES = {(1, 0): 0.01, (2, 3): 0.02, (1, 2): 0.03, (2, 0): 0.04, (1, 1): 0.05, (1, 3): 0.06,
          (2, 1): 0.07, (2, 2): 0.08}


def candidates(**over) -> Candidates:
    c = dict(
        num_layers=6, heads_per_layer={l: 4 for l in range(6)},
        heads=tuple(HeadCandidate(l, h, s, 10) for (l, h), s in sorted(SHARES.items(), key=lambda kv: kv[1])),
        layers=tuple(LayerCandidate(l, i, 1.0) for l, i in
                     [(0, 0.001), (3, 0.01), (1, 0.02), (4, 0.03), (2, 0.2), (5, 0.5)]),
        sparse_layers=(
            SparseLayerCandidate(2, 0.8, tuple(LadderStep(t, f) for t, f in
                                               [(0.01, 0.3), (0.05, 0.5), (0.1, 0.7), (0.3, 0.9)])),
            SparseLayerCandidate(1, 0.6, tuple(LadderStep(t, f) for t, f in
                                               [(0.01, 0.2), (0.1, 0.5), (0.5, 0.9)]))),
        traced_requests=10)
    c.update(over)
    return Candidates(**c)


def quality_loss(doc: dict, int8_cost: float = INT8_COST, head_cost: float = HEAD_INT8_COST) -> float:
    plan = Plan.from_doc(doc)     # every hypothesis must be a valid plan document
    loss = 0.0
    for t in plan.transforms:
        if t.kind == TransformKind.WEIGHT_PRECISION:
            loss += int8_cost * len(t.layers) + (head_cost if t.head is not None else 0.0)
        elif t.kind == TransformKind.ACTIVATION_SPARSITY:
            loss += sum(SPARSITY_COST[l] * th for l, th in t.thresholds.items())
        elif t.kind == TransformKind.PRUNE_HEADS:
            loss += sum(HEAD_COST * SHARES[(l, h)] for l, hs in t.heads.items() for h in hs)
        elif t.kind == TransformKind.SKIP_LAYERS:
            loss += sum(SKIP_COST[l] for l in t.layers)
    return loss


def changed_units(doc: dict) -> int:
    """How many things a plan changes (int8 layers, thresholds, heads, skipped layers)."""
    plan = Plan.from_doc(doc)
    units = 0
    for t in plan.transforms:
        if t.kind == TransformKind.WEIGHT_PRECISION:
            units += len(t.layers) + (t.head is not None)
        elif t.kind == TransformKind.ACTIVATION_SPARSITY:
            units += len(t.thresholds)
        elif t.kind == TransformKind.PRUNE_HEADS:
            units += sum(len(h) for h in t.heads.values())
        elif t.kind == TransformKind.SKIP_LAYERS:
            units += 10 * len(t.layers)   # a whole block: more than anything inside it
    return units


def speed(doc: dict) -> dict:
    """Synthetic latency and memory: every change makes the plan faster and smaller."""
    ratio = 1.0 / (1.0 + 0.05 * changed_units(doc))
    return {"latency_ratio": ratio, "memory_ratio": ratio}


def evaluator(int8_cost: float = INT8_COST, calls: list | None = None,
              head_cost: float = HEAD_INT8_COST):
    def evaluate(doc: dict) -> dict:
        if calls is not None:
            calls.append(doc)
        loss = quality_loss(doc, int8_cost, head_cost)
        return {"top1_agreement": 1.0 - loss, "ppl_ratio": 1.0 + loss / 4, "mean_kl": loss / 4,
                **speed(doc)}
    return evaluate


def kept_transforms(doc: dict) -> dict:
    return {t["kind"]: {k: v for k, v in t.items() if k != "kind"} for t in doc["transforms"]}


def test_keeps_exactly_the_changes_that_fit():
    result = Planner(evaluator(), BUDGET, record=None, settings=SETTINGS).run(TARGET, candidates())
    assert kept_transforms(result.best) == {
        "weight_precision": {"layers": {"0": "int8", "1": "int8", "2": "int8", "5": "int8",
                                        "lm_head": "int8"}},
        "activation_sparsity": {"thresholds": {"1": 0.1, "2": 0.3}},
        "prune_heads": {"heads": {"1": [0, 2], "2": [0, 3]}},
        "skip_layers": {"layers": [3, 4]},
    }
    assert [(r.phase, r.kept) for r in result.trail] == [
        (Phase.INT8, True),                                                   # all layers at once
        (Phase.INT8_HEAD, True),                                              # then the output head
        (Phase.SPARSITY, True), (Phase.SPARSITY, True), (Phase.SPARSITY, True),  # layer 2 -> 0.3
        (Phase.SPARSITY, True), (Phase.SPARSITY, False),                      # layer 1: 0.1, not 0.5
        (Phase.PRUNE_HEADS, True), (Phase.PRUNE_HEADS, False), (Phase.PRUNE_HEADS, True),  # 3, 5, 4 of 6
        (Phase.SKIP_LAYERS, True), (Phase.SKIP_LAYERS, False),                # 3 kept, 1 dropped
        (Phase.SKIP_LAYERS, True), (Phase.SKIP_LAYERS, False),                # 4 kept, 2 dropped
    ]
    assert result.best_trial is result.trail[12]
    assert result.stop_reason == "every candidate tried"
    assert 1.0 - quality_loss(result.best) >= BUDGET.min_top1


def test_every_hypothesis_is_the_kept_plan_plus_one_change():
    result = Planner(evaluator(), BUDGET, settings=SETTINGS).run(TARGET, candidates())
    skips = [r for r in result.trail if r.phase == Phase.SKIP_LAYERS]
    # "skip layer 1" is tried on top of the plan that kept layer 3 skipped, and nothing else new.
    assert kept_transforms(skips[1].plan)["skip_layers"] == {"layers": [1, 3]}
    assert kept_transforms(skips[2].plan)["skip_layers"] == {"layers": [3, 4]}
    # A skipped layer's other changes leave the document (the layer does not run).
    assert "1" not in kept_transforms(skips[1].plan)["activation_sparsity"]["thresholds"]


def test_records_every_hypothesis_in_order_with_reasons():
    recorded, proposed = [], []
    result = Planner(evaluator(), BUDGET, record=recorded.append, settings=SETTINGS,
                     propose=proposed.append).run(TARGET, candidates())
    assert recorded == result.trail
    assert proposed == [r.plan for r in recorded]
    assert [r.index for r in recorded] == list(range(1, len(recorded) + 1))
    assert [r.plan["plan_id"] for r in recorded][:2] == ["run1-t001", "run1-t002"]
    assert all(r.plan["query_classes"] == ["code"] and r.plan["model_fingerprint"] == FP
               for r in recorded)
    first, head, dropped = recorded[0], recorded[1], recorded[6]
    assert first.reason == ("kept: top1 0.9994 >= 0.97, ppl_ratio 1 <= 1.01, mean_kl 0.00015 <= 0.02, "
                            "latency_ratio 0.7692 <= 1")
    assert dropped.reason == "dropped: top1 0.9692 < 0.97"     # 0.0002 of it is the head
    assert dropped.change == "layer 1 MLP: zero |a| < 0.5 (~90% of activations)"
    assert first.change == "int8 weights on layers 0-5"
    assert (head.phase, head.change, head.kept) == (Phase.INT8_HEAD, "int8 weights on lm_head", True)
    assert head.reason == ("kept: top1 0.9992 >= 0.97, ppl_ratio 1 <= 1.01, mean_kl 0.0002 <= 0.02, "
                           "latency_ratio 0.7407 <= 1")


@pytest.mark.parametrize("max_trials", [0, 1, 6, 12])
def test_respects_max_trials(max_trials):
    calls = []
    result = Planner(evaluator(calls=calls), BUDGET, max_trials=max_trials,
                     settings=SETTINGS).run(TARGET, candidates())
    assert len(result.trail) == len(calls) == max_trials
    assert result.stop_reason == f"max_trials ({max_trials}) reached"
    kept = [r for r in result.trail if r.kept]
    assert result.best == (kept[-1].plan if kept else None)


def test_max_trials_mid_search_keeps_the_last_plan_that_fit():
    result = Planner(evaluator(), BUDGET, max_trials=6, settings=SETTINGS).run(TARGET, candidates())
    assert kept_transforms(result.best)["activation_sparsity"] == {"thresholds": {"1": 0.1, "2": 0.3}}
    assert "prune_heads" not in kept_transforms(result.best)


def test_int8_everywhere_too_costly_keeps_the_largest_prefix_by_influence():
    # 0.008 per layer: all six layers cost 0.048; three (0.024) fit, four (0.032) do not.
    cands = candidates(heads=(), sparse_layers=(), layers=candidates().layers)
    settings = settings_(max_trials=40, skip_candidates=0)
    result = Planner(evaluator(int8_cost=0.008), BUDGET, settings=settings).run(TARGET, cands)
    assert [r.kept for r in result.trail] == [False, True, False, True]   # all, 3, 4, lm_head
    # int8 candidates are ordered by influence: 0, 3, 1 are the least influential
    assert kept_transforms(result.best)["weight_precision"]["layers"] == {
        "0": "int8", "1": "int8", "3": "int8", "lm_head": "int8"}


def _head_trials(result):
    return [r for r in result.trail if r.phase == Phase.INT8_HEAD]


def test_head_int8_is_one_hypothesis_on_top_of_the_int8_blocks():
    # int8 on every block does not fit (6 x 0.008), three blocks do: the head is tried on those
    cands = candidates(heads=(), sparse_layers=())
    settings = settings_(max_trials=40, skip_candidates=0)
    result = Planner(evaluator(int8_cost=0.008), BUDGET, settings=settings).run(TARGET, cands)
    (head,) = _head_trials(result)
    assert result.trail.index(head) == 3 and head.kept
    assert kept_transforms(head.plan) == {"weight_precision": {"layers": {
        "0": "int8", "1": "int8", "3": "int8", "lm_head": "int8"}}}
    assert head.plan["notes"] == "planner hypothesis 4: int8 weights on lm_head"


def test_head_int8_over_budget_is_dropped_and_later_plans_leave_it_out():
    result = Planner(evaluator(head_cost=0.05), BUDGET, settings=SETTINGS).run(TARGET, candidates())
    (head,) = _head_trials(result)
    assert not head.kept and head.reason.startswith("dropped: top1 0.9494 < 0.97")
    assert "lm_head" in kept_transforms(head.plan)["weight_precision"]["layers"]
    later = result.trail[result.trail.index(head) + 1:]
    assert later and all("lm_head" not in kept_transforms(r.plan)["weight_precision"]["layers"]
                         for r in later)
    assert "lm_head" not in kept_transforms(result.best)["weight_precision"]["layers"]


def test_head_int8_refused_by_the_agent_is_dropped():
    def evaluate(doc):
        layers = next(t["layers"] for t in doc["transforms"] if t["kind"] == "weight_precision")
        if "lm_head" in layers:
            raise TrialError("transforms[0] (weight_precision).layers[lm_head]: cannot set the "
                             "output head to int8: the output head is Sequential, not nn.Linear")
        return evaluator()(doc)
    result = Planner(evaluate, BUDGET, settings=SETTINGS).run(TARGET, candidates())
    (head,) = _head_trials(result)
    assert not head.kept and head.evidence is None and "not nn.Linear" in head.reason
    assert result.best is not None and result.trail[-1].phase == Phase.SKIP_LAYERS


def test_head_int8_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HEADROOM_PLANNER_INT8_LM_HEAD", "no")
    settings = PlannerSettings.resolve(max_trials=40, fp32_packed=False)
    assert settings.int8_lm_head is False
    result = Planner(evaluator(), BUDGET, settings=settings).run(TARGET, candidates())
    assert not _head_trials(result)
    assert "lm_head" not in kept_transforms(result.best)["weight_precision"]["layers"]


def test_head_int8_alone_when_no_block_fits():
    def evaluate(doc):
        layers = next((t["layers"] for t in doc["transforms"] if t["kind"] == "weight_precision"), {})
        ok = set(layers) <= {"lm_head"} and not doc["transforms"][1:]
        return everything_fits(doc) if ok else {"top1_agreement": 0.5, "ppl_ratio": 2.0, "mean_kl": 1.0}
    settings = settings_(max_trials=40, skip_candidates=0)
    result = Planner(evaluate, BUDGET, settings=settings).run(TARGET, candidates(heads=(), sparse_layers=()))
    assert result.best["transforms"] == [{"kind": "weight_precision", "layers": {"lm_head": "int8"}}]
    assert result.best_trial.phase == Phase.INT8_HEAD


def test_failed_trials_are_dropped_and_the_search_goes_on():
    def evaluate(doc):
        kinds = {t["kind"] for t in doc["transforms"]}
        if "skip_layers" in kinds and 3 in next(t for t in doc["transforms"] if t["kind"] == "skip_layers")["layers"]:
            raise TrialError("agent refused: layer 3 holds a hook")
        if "prune_heads" in kinds:
            return {"error": "out of memory"}
        return evaluator()(doc)
    result = Planner(evaluate, BUDGET, settings=SETTINGS).run(TARGET, candidates())
    heads = [r for r in result.trail if r.phase == Phase.PRUNE_HEADS]
    skips = [r for r in result.trail if r.phase == Phase.SKIP_LAYERS]
    assert heads and all(not r.kept and r.reason == "dropped: trial failed: out of memory" for r in heads)
    assert skips[0].reason == "dropped: trial failed: agent refused: layer 3 holds a hook"
    assert skips[0].evidence is None
    # Without the head savings there is room to skip layer 1 (0.0255 lost), then layer 4.
    assert kept_transforms(result.best)["skip_layers"] == {"layers": [1, 4]}


def everything_fits(doc):
    return {"top1_agreement": 1.0, "ppl_ratio": 1.0, "mean_kl": 0.0, **speed(doc)}


def test_heads_leave_min_heads_per_layer():
    settings = settings_(max_trials=40, min_heads_per_layer=2, skip_candidates=0)
    result = Planner(everything_fits, BUDGET, settings=settings).run(TARGET, candidates())
    # 4 heads per layer, 2 must stay: the two lowest-share heads of layers 1 and 2 go.
    assert kept_transforms(result.best)["prune_heads"] == {"heads": {"1": [0, 2], "2": [0, 3]}}


@pytest.mark.parametrize("protect, skipped", [(True, [1, 2, 3, 4]), (False, [0, 1, 3, 4])])
def test_edge_layers_are_never_skipped_unless_allowed(protect, skipped):
    settings = settings_(max_trials=40, max_skip_layers=4, protect_edge_layers=protect)
    result = Planner(everything_fits, BUDGET, settings=settings).run(TARGET, candidates())
    assert kept_transforms(result.best)["skip_layers"]["layers"] == skipped


@pytest.mark.parametrize("protect", [True, False])
def test_edge_layers_get_no_sparsity_or_head_pruning_unless_allowed(protect):
    edge_sparse = SparseLayerCandidate(0, 0.9, (LadderStep(0.01, 0.3),))
    edge_heads = tuple(HeadCandidate(5, h, 0.001, 10) for h in range(2))
    cands = candidates(sparse_layers=(edge_sparse,) + candidates().sparse_layers,
                       heads=edge_heads + candidates().heads)
    settings = settings_(max_trials=60, skip_candidates=0, protect_edge_layers=protect)
    best = kept_transforms(Planner(everything_fits, BUDGET, settings=settings).run(TARGET, cands).best)
    assert ("0" in best["activation_sparsity"]["thresholds"]) is not protect
    assert ("5" in best["prune_heads"]["heads"]) is not protect


def test_search_is_deterministic():
    runs = [Planner(evaluator(), BUDGET, settings=SETTINGS).run(TARGET, candidates()) for _ in range(2)]
    assert [(r.plan, r.kept, r.reason, r.change) for r in runs[0].trail] == \
           [(r.plan, r.kept, r.reason, r.change) for r in runs[1].trail]


def test_dynamic_plans_only_search_thresholds():
    target = PlanTarget(FP, "dyn", ("chat",), PlanMode.DYNAMIC)
    budget = QualityBudget(min_top1=0.975)    # 0.3 on layer 2 (0.015) + 0.1 on layer 1 (0.003)
    result = Planner(evaluator(), budget, settings=SETTINGS).run(target, candidates())
    assert {r.phase for r in result.trail} == {Phase.SPARSITY}
    assert result.best["mode"] == "dynamic"
    assert kept_transforms(result.best) == {"activation_sparsity": {"thresholds": {"1": 0.1, "2": 0.3}}}


def test_nothing_fits_gives_no_plan():
    hopeless = lambda doc: {"top1_agreement": 0.5, "ppl_ratio": 2.0, "mean_kl": 1.0, **speed(doc)}
    result = Planner(hopeless, BUDGET, settings=SETTINGS).run(TARGET, candidates())
    assert result.best is None and result.best_trial is None and result.trail
    assert not any(r.kept for r in result.trail)


@pytest.mark.parametrize("evidence, ok, reason", [
    ({"top1_agreement": 0.985, "ppl_ratio": 1.004, "mean_kl": 0.01, "latency_ratio": 0.9}, True,
     "kept: top1 0.985 >= 0.97, ppl_ratio 1.004 <= 1.01, mean_kl 0.01 <= 0.02, latency_ratio 0.9 <= 1"),
    ({"top1_agreement": 0.985, "ppl_ratio": 1.02, "mean_kl": 0.01, "latency_ratio": 0.9}, False,
     "dropped: ppl_ratio 1.02 > 1.01"),
    ({"top1_agreement": 0.9, "ppl_ratio": 1.02, "mean_kl": 0.03, "latency_ratio": 0.9}, False,
     "dropped: top1 0.9 < 0.97, ppl_ratio 1.02 > 1.01, mean_kl 0.03 > 0.02"),
    ({"ppl_ratio": 1.0, "mean_kl": 0.0, "latency_ratio": 0.9}, False,
     "dropped: evidence has no finite top1_agreement (got None)"),
    ({"top1_agreement": math.nan, "ppl_ratio": 1.0, "mean_kl": 0.0, "latency_ratio": 0.9}, False,
     "dropped: evidence has no finite top1_agreement (got nan)"),
    ({"top1_agreement": 0.97, "ppl_ratio": 1.01, "mean_kl": 0.02, "latency_ratio": 1.0}, True,
     "kept: top1 0.97 >= 0.97, ppl_ratio 1.01 <= 1.01, mean_kl 0.02 <= 0.02, latency_ratio 1 <= 1"),
    # Inside the quality budget but slower than unoptimised: not kept.
    ({"top1_agreement": 1.0, "ppl_ratio": 1.0, "mean_kl": 0.0, "latency_ratio": 1.001}, False,
     "dropped: latency_ratio 1.001 > 1"),
    ({"top1_agreement": 1.0, "ppl_ratio": 1.0, "mean_kl": 0.0}, False,
     "dropped: evidence has no finite latency_ratio (got None)"),
])
def test_budget_check(evidence, ok, reason):
    assert BUDGET.check(evidence) == (ok, reason)


def test_budget_with_exact_match():
    budget = QualityBudget(min_exact_match=0.9)
    assert budget.check({"top1_agreement": 1, "ppl_ratio": 1, "mean_kl": 0, "exact_match": 0.8,
                         "latency_ratio": 0.5}) == \
        (False, "dropped: exact_match 0.8 < 0.9")


@pytest.mark.parametrize("bad", [{"max_trials": -1}, {"min_heads_per_layer": 0},
                                 {"min_zero_fraction": 1.5}])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        settings_(**bad)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("HEADROOM_PLANNER_MAX_TRIALS", "7")
    monkeypatch.setenv("HEADROOM_PLANNER_PROTECT_EDGE_LAYERS", "no")
    s = PlannerSettings.resolve(skip_candidates=2)
    assert (s.max_trials, s.protect_edge_layers, s.skip_candidates) == (7, False, 2)
    monkeypatch.setenv("HEADROOM_PLANNER_MAX_TRIALS", "many")
    with pytest.raises(ValueError, match="HEADROOM_PLANNER_MAX_TRIALS"):
        PlannerSettings.resolve()


# ------------------------------------------------------------ the execution trial (compiled decode)

def timed(compiled_ms: float, eager_ms: float = 80.0, base_ms: float = 100.0):
    """The synthetic quality model, plus a decode latency that only compilation changes."""
    inner = evaluator()

    def evaluate(doc: dict) -> dict:
        compiled = any(t["kind"] == "execution" for t in doc["transforms"])
        plan_ms = compiled_ms if compiled else eager_ms
        return {**inner(doc), "latency_ms_per_token_plan": plan_ms, "latency_ratio": plan_ms / base_ms}
    return evaluate


@pytest.mark.parametrize("compiled_ms,kept", [(50.0, True), (80.0, False), (95.0, False)])
def test_compiled_decode_is_the_last_trial_kept_only_when_faster(compiled_ms, kept):
    settings = settings_(max_trials=40, compiled_decode=True)
    result = Planner(timed(compiled_ms), BUDGET, settings=settings).run(TARGET, candidates())
    last = result.trail[-1]
    assert last.phase == Phase.EXECUTION and last.kept is kept
    assert kept_transforms(last.plan)["execution"] == {"static_kv_cache": True,
                                                      "compile": "torch_compile"}
    assert ("execution" in kept_transforms(result.best)) is kept
    assert ("not faster" in last.reason) is not kept


def test_compiled_decode_keeps_its_trial_when_the_budget_runs_out():
    settings = settings_(max_trials=4, compiled_decode=True)
    result = Planner(timed(50.0), BUDGET, settings=settings).run(TARGET, candidates())
    assert [t.phase for t in result.trail][-1] == Phase.EXECUTION and len(result.trail) == 4
    assert "execution" in kept_transforms(result.best)


def test_dynamic_plans_get_no_compiled_decode():
    target = PlanTarget(FP, "dyn", ("code",), PlanMode.DYNAMIC)
    settings = settings_(max_trials=40, compiled_decode=True)
    result = Planner(timed(50.0), BUDGET, settings=settings).run(target, candidates())
    assert all(t.phase != Phase.EXECUTION for t in result.trail)


# ------------------------------------------------------------ the objective: fastest, or smallest

def _record(index: int, latency: float, memory: float, kept: bool = True) -> TrialRecord:
    ev = {"latency_ratio": latency, "memory_ratio": memory}
    return TrialRecord(index, Phase.INT8, f"t{index}", {"plan_id": f"t{index}"}, ev, kept, "", 0.0)


def test_latency_objective_takes_the_fastest_not_the_last_kept():
    trail = [_record(1, 0.80, 0.50), _record(2, 0.70, 0.60), _record(3, 0.90, 0.30)]
    assert choose_best(trail, Objective.LATENCY, 0.0).index == 2


def test_memory_objective_takes_the_smallest():
    trail = [_record(1, 0.80, 0.50), _record(2, 0.70, 0.60), _record(3, 0.90, 0.30)]
    assert choose_best(trail, Objective.MEMORY, 0.0).index == 3


@pytest.mark.parametrize("second_latency, best", [
    (0.70 * 1.03, 2),      # exactly at the tie fraction: tied, the smaller plan wins
    (0.70 * 1.0301, 1),    # just past it: the faster plan wins
])
def test_memory_breaks_a_latency_tie(second_latency, best):
    trail = [_record(1, 0.70, 0.60), _record(2, second_latency, 0.40)]
    assert choose_best(trail, Objective.LATENCY, 0.03).index == best


def test_dropped_trials_and_missing_latency_never_win():
    trail = [_record(1, 0.5, 0.1, kept=False), _record(2, 0.9, 0.9),
             TrialRecord(3, Phase.INT8, "t3", {}, {"memory_ratio": 0.1}, True, "", 0.0)]
    assert choose_best(trail, Objective.LATENCY, 0.0).index == 2
    assert choose_best([_record(1, 0.5, 0.1, kept=False)], Objective.LATENCY, 0.0) is None


def test_a_slower_plan_is_never_kept_under_the_default_budget():
    slow = lambda doc: {**everything_fits(doc), "latency_ratio": 1.05}
    result = Planner(slow, BUDGET, settings=SETTINGS).run(TARGET, candidates())
    assert result.best is None and all("latency_ratio 1.05 > 1" in r.reason for r in result.trail)


def test_a_stated_trade_raises_the_latency_bound_and_optimises_memory():
    slow = lambda doc: {**everything_fits(doc), "latency_ratio": 1.05}
    budget = dataclasses.replace(BUDGET, max_latency_ratio=1.1)
    result = Planner(slow, budget, settings=SETTINGS, objective=Objective.MEMORY).run(TARGET, candidates())
    assert result.best is not None and result.objective is Objective.MEMORY


def packed_evaluator(packed_ratio: float):
    """Quality-neutral trials; a plan with fp32_packed layers runs at `packed_ratio`."""
    def evaluate(doc: dict) -> dict:
        wp = kept_transforms(doc).get("weight_precision", {}).get("layers", {})
        ratio = packed_ratio if "fp32_packed" in wp.values() else 1.0
        return {"top1_agreement": 1.0, "ppl_ratio": 1.0, "mean_kl": 0.0,
                "latency_ratio": ratio, "memory_ratio": 1.0}
    return evaluate


@pytest.mark.parametrize("ratio, kept", [(0.999, True), (1.0, False), (1.2, False)])
def test_fp32_packed_is_tried_first_and_kept_only_when_faster(ratio, kept):
    planner = Planner(packed_evaluator(ratio), BUDGET, max_trials=1,
                      settings=settings_(fp32_packed=True))
    first = planner.run(TARGET, candidates()).trail[0]
    assert (first.phase, first.kept) == (Phase.FP32_PACKED, kept)
    layers = {str(l): "fp32_packed" for l in range(6)}
    assert kept_transforms(first.plan)["weight_precision"] == {"layers": {**layers,
                                                                          "lm_head": "fp32_packed"}}


def test_int8_layers_replace_packed_ones_and_skipped_layers_leave_the_document():
    result = Planner(packed_evaluator(0.8), BUDGET, settings=settings_(fp32_packed=True)).run(
        TARGET, candidates())
    int8 = next(r for r in result.trail if r.phase == Phase.INT8)
    layers = kept_transforms(int8.plan)["weight_precision"]["layers"]
    assert layers.pop("lm_head") == "fp32_packed"               # int8 there is the next trial
    assert set(layers.values()) == {"int8"} and len(layers) == 6
    skip = next(r for r in result.trail if r.phase == Phase.SKIP_LAYERS and r.kept)
    skipped = kept_transforms(skip.plan)["skip_layers"]["layers"]
    assert not set(map(str, skipped)) & set(kept_transforms(skip.plan)["weight_precision"]["layers"])


def test_where_int8_does_not_fit_the_packed_layers_stay_under_the_later_changes():
    packed = packed_evaluator(0.8)

    def evaluate(doc: dict) -> dict:
        layers = kept_transforms(doc).get("weight_precision", {}).get("layers", {})
        int8_blocks = [k for k, v in layers.items() if v == "int8" and k != "lm_head"]
        return {**packed(doc), "top1_agreement": 0.5 if int8_blocks else 1.0}
    result = Planner(evaluate, BUDGET, settings=settings_(fp32_packed=True)).run(
        TARGET, candidates())
    head = next(r for r in result.trail if r.phase == Phase.INT8_HEAD)
    assert head.kept and not any(r.kept for r in result.trail if r.phase == Phase.INT8)
    layers = kept_transforms(head.plan)["weight_precision"]["layers"]
    assert layers == {**{str(l): "fp32_packed" for l in range(6)}, "lm_head": "int8"}
