"""Executor: refusals touch nothing, apply is all-or-nothing, rollback is bitwise."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.executor import Executor, TransformError, weight_bytes
from headroom_sidecar.agent.executor.executor import DEFAULT_APPLIERS
from headroom_sidecar.agent.executor.int8 import Int8Embedding, Int8Linear
from headroom_sidecar.proto.plan import PlanError, TransformKind
from tests.agent.executor import (assert_bitwise_equal, greedy, logits, plan, rig,
                                  state_snapshot)
from tests.builders import tiny_gpt2, tiny_llama, tiny_plain, tiny_qwen2

PRUNE = {"kind": "prune_heads", "heads": {"0": [0, 3], "2": [1, 2, 3]}}
SKIP = {"kind": "skip_layers", "layers": [1]}
SPARSE = {"kind": "activation_sparsity", "thresholds": {"0": 0.05, "2": 0.02}}
INT8 = {"kind": "weight_precision", "layers": {"0": "int8", "2": "int8"}}
EXEC = {"kind": "execution", "static_kv_cache": True, "compile": "torch_compile"}
SINGLE = {"prune": [PRUNE], "skip": [SKIP], "sparse": [SPARSE], "int8": [INT8], "exec": [EXEC]}
COMBINED = {"all": [PRUNE, SKIP, SPARSE, INT8, EXEC], "prune+int8+sparse": [INT8, SPARSE, PRUNE],
            "skip+prune-same-layer": [SKIP, {"kind": "prune_heads", "heads": {"1": [0]}}]}


@pytest.mark.parametrize("name", sorted(SINGLE) + sorted(COMBINED))
@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_rollback_is_bitwise(builder, name):
    r = rig(builder())
    snap, base, gen = state_snapshot(r.model), logits(r.model), greedy(r.model)
    report = r.executor.apply(plan(r.fingerprint, *({**SINGLE, **COMBINED}[name])))
    assert report.applied and r.executor.active_plan is not None
    changed = logits(r.model)
    if name != "exec":
        assert not torch.equal(changed, base)
    r.executor.rollback()
    assert r.executor.active_plan is None
    assert torch.equal(logits(r.model), base)
    assert torch.equal(greedy(r.model), gen)
    assert_bitwise_equal(r.model, snap)


@pytest.mark.parametrize("builder,transforms", [
    (tiny_gpt2, [SKIP, SPARSE, INT8]),
    (tiny_plain, [SKIP, SPARSE, INT8]),
])
def test_rollback_other_architectures(builder, transforms):
    r = rig(builder())
    snap, base = state_snapshot(r.model), logits(r.model)
    before = weight_bytes(r.model)
    r.executor.apply(plan(r.fingerprint, *transforms))
    assert not torch.equal(logits(r.model), base) and weight_bytes(r.model) < before
    r.executor.rollback()
    assert torch.equal(logits(r.model), base)
    assert_bitwise_equal(r.model, snap)


@pytest.mark.parametrize("builder,kind", [(tiny_gpt2, "prune_heads"), (tiny_plain, "prune_heads"),
                                          (tiny_plain, "execution")])
def test_unsupported_transform_is_refused_by_name(builder, kind):
    r = rig(builder())
    t = PRUNE if kind == "prune_heads" else EXEC
    with pytest.raises(PlanError, match=f"{kind}: not supported for"):
        r.executor.apply(plan(r.fingerprint, t))


REFUSED = {
    "fingerprint": lambda fp: plan("0" * 64, SKIP),
    "layer-range": lambda fp: plan(fp, {"kind": "skip_layers", "layers": [7]}),
    "head-range": lambda fp: plan(fp, {"kind": "prune_heads", "heads": {"0": [9]}}),
    "all-skipped": lambda fp: plan(fp, {"kind": "skip_layers", "layers": [0, 1, 2]}),
    "all-heads-everywhere": lambda fp: plan(fp, {"kind": "prune_heads", "heads": {
        str(i): [0, 1, 2, 3] for i in range(3)}}),
    "mixed-no-attention-left": lambda fp: plan(fp, {"kind": "skip_layers", "layers": [0, 1]},
                                               {"kind": "prune_heads", "heads": {"2": [0, 1, 2, 3]}}),
    "dynamic-structural": lambda fp: plan(fp, SKIP, mode="dynamic"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_plan_leaves_model_bitwise_untouched(case):
    r = rig(tiny_llama())
    snap, base = state_snapshot(r.model), logits(r.model)
    with pytest.raises(PlanError) as err:
        r.executor.apply(REFUSED[case](r.fingerprint))
    assert err.value.problems
    assert r.executor.active_plan is None
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base)


def test_refusal_lists_every_problem():
    r = rig(tiny_llama())
    p = plan("f" * 64, {"kind": "skip_layers", "layers": [5]},
             {"kind": "prune_heads", "heads": {"0": [4]}})
    with pytest.raises(PlanError) as err:
        r.executor.apply(p)
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 3
    assert "fingerprint" in text and "[5] out of range" in text and "[4] out of range" in text


def test_failing_transform_midway_restores_everything():
    r = rig(tiny_llama())
    snap, base, gen = state_snapshot(r.model), logits(r.model), greedy(r.model)

    def int8_then_fail(ex, t, log):
        DEFAULT_APPLIERS[TransformKind.WEIGHT_PRECISION](ex, t, log)   # real changes first
        raise RuntimeError("injected failure after quantising")

    ex = Executor(r.model, r.structure, r.fingerprint,
                  appliers={**DEFAULT_APPLIERS, TransformKind.WEIGHT_PRECISION: int8_then_fail})
    with pytest.raises(TransformError, match="weight_precision failed.*injected"):
        ex.apply(plan(r.fingerprint, PRUNE, SKIP, SPARSE, INT8, EXEC))
    assert ex.active_plan is None
    assert r.model.generation_config.cache_implementation != "static"
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base) and torch.equal(greedy(r.model), gen)


def test_apply_over_active_plan_replaces_it():
    r = rig(tiny_llama())
    base = logits(r.model)
    r.executor.apply(plan(r.fingerprint, SKIP, plan_id="a"))
    only_sparse = plan(r.fingerprint, SPARSE, plan_id="b")
    r.executor.apply(only_sparse)
    fresh = rig(tiny_llama())
    fresh.executor.apply(plan(fresh.fingerprint, SPARSE))
    assert r.executor.active_plan.plan_id == "b"
    torch.testing.assert_close(logits(r.model), logits(fresh.model), rtol=0, atol=0)
    r.executor.rollback()
    assert torch.equal(logits(r.model), base)


def test_report_counts():
    r = rig(tiny_llama())
    rep = r.executor.apply(plan(r.fingerprint, PRUNE, SKIP, INT8))
    assert rep.applied == ["skip_layers", "prune_heads", "weight_precision"]
    assert rep.heads_removed == 2 + 3 + 4 and rep.layers_skipped == 1
    assert rep.weight_bytes_after < rep.weight_bytes_before
    assert rep.weight_bytes_after == weight_bytes(r.model)


def test_execution_static_cache_keeps_greedy_output_and_rolls_back():
    # Compiled decode itself: tests/agent/executor/test_compiled.py.
    r = rig(tiny_llama())
    gen = greedy(r.model)
    r.executor.apply(plan(r.fingerprint, {**EXEC, "compile": "none"}))
    assert r.model.generation_config.cache_implementation == "static"
    assert torch.equal(greedy(r.model), gen)
    r.executor.rollback()
    assert r.model.generation_config.cache_implementation is None


def test_lock_is_held_during_apply():
    r = rig(tiny_llama())
    seen = []

    def probe(ex, t, log):
        seen.append(ex.lock.locked())
        return []
    ex = Executor(r.model, r.structure, r.fingerprint,
                  appliers={**DEFAULT_APPLIERS, TransformKind.SKIP_LAYERS: probe})
    ex.apply(plan(r.fingerprint, SKIP))
    assert seen == [True] and not ex.lock.locked()


# ------------------------------------------------------------------ int8 output head (lm_head)

HEAD = {"kind": "weight_precision", "layers": {"lm_head": "int8"}}
HEAD_AND_BLOCKS = {"kind": "weight_precision", "layers": {"0": "int8", "2": "int8", "lm_head": "int8"}}


def llama_tied(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("transform", [HEAD, HEAD_AND_BLOCKS], ids=["head", "head+blocks"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_head_int8_apply_baseline_rollback(tied, transform):
    r = rig(llama_tied(tied))
    head, emb = r.model.lm_head, r.model.model.embed_tokens
    assert (head.weight.data_ptr() == emb.weight.data_ptr()) == tied
    snap, base, gen = state_snapshot(r.model), logits(r.model), greedy(r.model)
    rep = r.executor.apply(plan(r.fingerprint, transform))

    live_head, live_emb = r.model.get_output_embeddings(), r.model.get_input_embeddings()
    assert isinstance(live_head, Int8Linear) and live_head.out_features == 128
    assert isinstance(live_emb, Int8Embedding) == tied
    if tied and hasattr(live_head, "weight_int8"):   # fbgemm keeps only its packed copy
        # one int8 matrix for both: still tied, at 1 byte per weight
        assert live_emb.weight_int8.data_ptr() == live_head.weight_int8.data_ptr()
    assert any(n.startswith("lm_head: int8") and ("tied embedding" in n) == tied for n in rep.notes)
    saved_bytes = rep.weight_bytes_before - rep.weight_bytes_after
    assert saved_bytes > 0.9 * 128 * 64 * 3           # the head's 4-byte weights now take 1
    applied = logits(r.model)
    assert 0 < _rel_err(applied, base) < 0.03

    with r.executor.baseline():                # the original head object, bitwise
        assert r.model.lm_head is head and r.model.model.embed_tokens is emb
        assert torch.equal(logits(r.model), base)
    assert r.model.get_output_embeddings() is live_head
    torch.testing.assert_close(logits(r.model), applied, rtol=1e-6, atol=1e-6)

    r.executor.rollback()
    assert r.model.lm_head is head and r.model.model.embed_tokens is emb
    assert (head.weight.data_ptr() == emb.weight.data_ptr()) == tied
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base) and torch.equal(greedy(r.model), gen)


def test_head_int8_saves_three_bytes_per_head_weight():
    tied, untied = rig(llama_tied(True)), rig(llama_tied(False))
    saved = [x.executor.apply(plan(x.fingerprint, HEAD)) for x in (tied, untied)]
    saved = [s.weight_bytes_before - s.weight_bytes_after for s in saved]
    # untied: only the head's 128 x 64 fp32 goes to int8; tied: the shared matrix, counted once
    assert 0.9 * 128 * 64 * 3 < saved[0] <= 128 * 64 * 3
    assert 0.9 * 128 * 64 * 3 < saved[1] <= 128 * 64 * 3


def test_head_int8_gpt2_tied_conv1d_blocks():
    r = rig(tiny_gpt2())
    snap, base = state_snapshot(r.model), logits(r.model)
    r.executor.apply(plan(r.fingerprint, SKIP, HEAD_AND_BLOCKS))
    assert isinstance(r.model.lm_head, Int8Linear)
    assert isinstance(r.model.transformer.wte, Int8Embedding)
    assert 0 < _rel_err(logits(r.model), base)
    r.executor.rollback()
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base)


def test_head_int8_reapplied_over_an_active_head_plan():
    # The head is judged on the unoptimised model: the applied plan's Int8Linear head does not
    # make the next plan (or a trial's validate) refuse it.
    r = rig(llama_tied(True))
    base = logits(r.model)
    r.executor.apply(plan(r.fingerprint, HEAD, plan_id="a"))
    r.executor.validate(plan(r.fingerprint, HEAD_AND_BLOCKS, plan_id="b"))
    r.executor.apply(plan(r.fingerprint, HEAD_AND_BLOCKS, plan_id="b"))
    assert r.executor.active_plan.plan_id == "b" and isinstance(r.model.lm_head, Int8Linear)
    r.executor.rollback()
    assert torch.equal(logits(r.model), base)


@pytest.mark.parametrize("case", ["plain", "sequential-head"])
def test_head_int8_refused_when_head_is_not_linear(case):
    model = tiny_plain() if case == "plain" else tiny_llama()
    if case == "sequential-head":
        model.lm_head = torch.nn.Sequential(model.lm_head)
    r = rig(model)
    snap, base = state_snapshot(r.model), logits(r.model)
    with pytest.raises(PlanError) as err:
        r.executor.apply(plan(r.fingerprint, HEAD_AND_BLOCKS))
    assert [p for p in err.value.problems
            if p.startswith("plan.transforms[0].layers.lm_head: cannot set")]
    assert r.executor.active_plan is None
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base)
