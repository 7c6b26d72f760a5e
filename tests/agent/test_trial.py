"""Trials: evidence measured against the same model without the plan, in one run."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from headroom_sidecar.agent.trial import EvalSet, Evidence, run_trial, stdlib_doc_texts
from tests.agent.executor import assert_bitwise_equal, logits, plan, rig, state_snapshot
from tests.builders import tiny_llama, token_ids


def _evalset(n_seq=3, seq_len=24, n_prompts=2, new_tokens=5) -> EvalSet:
    return EvalSet(sequences=[token_ids(seq_len, seed=10 + i)[0] for i in range(n_seq)],
                   prompts=[token_ids(6, seed=20 + i)[0] for i in range(n_prompts)],
                   new_tokens=new_tokens)


class ByteTokenizer:
    """A real (if tiny) tokenizer: one token per UTF-8 byte."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}


def test_identity_plan_gives_perfect_agreement():
    r = rig(tiny_llama())
    ev = _evalset()
    e = run_trial(r.model, r.structure, r.executor, plan(r.fingerprint), ev, latency_repeats=2)
    assert e.top1_agreement == 1.0 and e.exact_match == 1.0
    assert math.isclose(e.mean_kl, 0.0, abs_tol=1e-7) and math.isclose(e.ppl_ratio, 1.0, rel_tol=1e-6)
    assert e.eval_tokens == 3 * 23 and e.n_prompts == 2
    assert e.weight_bytes_base == e.weight_bytes_plan and e.memory_ratio == 1.0
    assert e.latency_ms_per_token_base > 0 and e.latency_ms_per_token_plan > 0
    assert e.heads_removed_fraction == 0 and e.layers_removed_fraction == 0
    # 2 rounds x 2 prompts, each pair back to back; spread and warm-up reported apart
    assert e.latency_pairs == 4 and e.latency_ratio == e.latency_ratio_median > 0
    assert e.latency_ratio_min <= e.latency_ratio <= e.latency_ratio_max
    assert e.latency_ms_per_token_plan_min <= e.latency_ms_per_token_plan <= e.latency_ms_per_token_plan_max
    assert e.warmup_ms_plan > 0 and e.timed_on == "MainThread"


def test_one_new_token_has_no_decode_to_time():
    r = rig(tiny_llama())
    e = run_trial(r.model, r.structure, r.executor, plan(r.fingerprint), _evalset(new_tokens=1),
                  latency_repeats=2)
    assert e.latency_pairs == 0 and math.isnan(e.latency_ratio)
    assert any("latency: not timed" in n for n in e.notes)


def test_destructive_plan_lowers_agreement_and_model_ends_unoptimised():
    r = rig(tiny_llama(layers=4))
    snap, base = state_snapshot(r.model), logits(r.model)
    p = plan(r.fingerprint, {"kind": "skip_layers", "layers": [0, 1]},
             {"kind": "prune_heads", "heads": {"2": [0, 1, 2]}},
             {"kind": "weight_precision", "layers": {"3": "int8"}})
    e = run_trial(r.model, r.structure, r.executor, p, _evalset(), latency_repeats=1)
    assert e.top1_agreement < 0.9 and e.mean_kl > 1e-3 and e.ppl_ratio != 1.0
    assert e.layers_removed_fraction == 0.5 and e.heads_removed_fraction == (8 + 3) / 16
    assert e.memory_ratio < 1.0
    assert r.executor.active_plan is None
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base)


def test_active_plan_is_restored_after_trial():
    r = rig(tiny_llama())
    served = plan(r.fingerprint, {"kind": "skip_layers", "layers": [2]}, plan_id="served")
    r.executor.apply(served)
    served_logits = logits(r.model)
    p = plan(r.fingerprint, {"kind": "activation_sparsity", "thresholds": {"0": 0.05}})
    e = run_trial(r.model, r.structure, r.executor, p, _evalset(), latency_repeats=1)
    assert e.top1_agreement < 1.0 or e.mean_kl > 0      # measured against the unoptimised model
    assert r.executor.active_plan.plan_id == "served"
    assert torch.equal(logits(r.model), served_logits)


HEAD_INT8 = {"kind": "weight_precision", "layers": {"1": "int8", "lm_head": "int8"}}


def test_head_int8_trial_while_a_head_int8_plan_serves():
    # The served plan's head is an Int8Linear (no .weight): the trial reads the vocabulary
    # from out_features, measures against the unoptimised model, and puts the served plan back.
    from headroom_sidecar.agent.executor.int8 import Int8Linear
    r = rig(tiny_llama())
    snap, base = state_snapshot(r.model), logits(r.model)
    served = plan(r.fingerprint, {"kind": "weight_precision", "layers": {"lm_head": "int8"}},
                  plan_id="served")
    r.executor.apply(served)
    served_logits = logits(r.model)
    e = run_trial(r.model, r.structure, r.executor, plan(r.fingerprint, HEAD_INT8), _evalset(),
                  latency_repeats=1)
    assert e.memory_ratio < 1.0 and e.mean_kl > 0 and e.top1_agreement > 0.8
    assert any(n.startswith("lm_head: int8") for n in e.notes)
    assert r.executor.active_plan is served and isinstance(r.model.lm_head, Int8Linear)
    torch.testing.assert_close(logits(r.model), served_logits, rtol=1e-6, atol=1e-6)
    r.executor.rollback()
    assert_bitwise_equal(r.model, snap)
    assert torch.equal(logits(r.model), base)


def test_eval_size_guard_reads_an_int8_head():
    r = rig(tiny_llama())
    r.executor.apply(plan(r.fingerprint, HEAD_INT8, plan_id="served"))
    tokens = (2 << 30) // (128 * 4) + 2          # one token over 2 GiB of fp32 log-probs
    huge = EvalSet(sequences=[torch.zeros(tokens, dtype=torch.long)], prompts=[])
    with pytest.raises(ValueError, match=f"{tokens - 1} tokens x 128 vocab"):
        run_trial(r.model, r.structure, r.executor, plan(r.fingerprint), huge)


def test_keep_applied():
    r = rig(tiny_llama())
    p = plan(r.fingerprint, {"kind": "skip_layers", "layers": [1]})
    run_trial(r.model, r.structure, r.executor, p, _evalset(), latency_repeats=1, keep_applied=True)
    assert r.executor.active_plan is p


def test_evidence_json_roundtrip():
    e = Evidence("p", "h" * 64, 0.9, 0.1, 1.05, 0.5, 2.0, 1.5, 400, 100, 10, 2, 0.1, 0.0, 3.0, 3.15,
                 notes=["n"], latency_pairs=6, latency_ratio_median=0.7, latency_ratio_min=0.6,
                 latency_ratio_max=0.8, latency_ms_per_token_base_min=1.9,
                 latency_ms_per_token_base_max=2.2, latency_ms_per_token_plan_min=1.4,
                 latency_ms_per_token_plan_max=1.6, warmup_ms_base=30.0, warmup_ms_plan=900.0,
                 timed_on="MainThread (serving_thread)", kernels={"model.layers.0.mlp.up_proj": {
                     "kernel": "int8pack_bf16"}})
    back = Evidence.from_json(e.to_json())
    # the paired median, not the ratio of the medians (0.75), is the latency ratio
    assert back == e and back.latency_ratio == 0.7 and back.memory_ratio == 0.25
    unpaired = Evidence("p", "h" * 64, 0.9, 0.1, 1.05, 0.5, 2.0, 1.5, 400, 100, 10, 2, 0.1, 0.0)
    assert unpaired.latency_ratio == 0.75


def test_unmeasured_figures_are_null_in_strict_json():
    e = Evidence("p", "h" * 64, 0.9, 0.1, 1.05, 0.5, float("nan"), float("nan"), 400, 100, 10, 0,
                 0.1, 0.0)
    text = e.to_json()
    assert "NaN" not in text and json.loads(text)["latency_ratio"] is None
    back = Evidence.from_json(text)
    assert math.isnan(back.latency_ms_per_token_base) and math.isnan(back.ppl_base)


def test_evalset_from_texts():
    texts = stdlib_doc_texts()[:3]
    ev = EvalSet.from_texts(ByteTokenizer(), texts, seq_len=32, prompts=2, new_tokens=4,
                            max_sequences=3, prompt_tokens=8)
    joined = "\n\n".join(texts).encode()
    assert len(ev.sequences) == 3 and ev.sequences[1].tolist() == list(joined[32:64])
    assert [len(p) for p in ev.prompts] == [8, 8] and ev.prompts[0].tolist() == list(joined[96:104])
    named = EvalSet.from_texts(ByteTokenizer(), texts, 32, ["def f():"], 4)
    assert named.prompts[0].tolist() == list(b"def f():")


@pytest.mark.smollm2
def test_smollm2_int8_and_sparsity_trial_and_bitwise_rollback():
    from workloads.smollm2 import load_smollm2
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    r = rig(model)
    ev = EvalSet.from_texts(tok, stdlib_doc_texts()[:40], seq_len=64, prompts=3, new_tokens=12,
                            max_sequences=4, prompt_tokens=16)
    snap, ids = state_snapshot(model), ev.sequences[0][:32].unsqueeze(0)
    base = logits(model, ids)
    n = r.structure.num_layers
    p = plan(r.fingerprint,
             {"kind": "weight_precision", "layers": {str(i): "int8" for i in range(n)}},
             {"kind": "activation_sparsity", "thresholds": {str(i): 0.005 for i in range(n)}})
    e = run_trial(model, r.structure, r.executor, p, ev, latency_repeats=1)
    print(f"\nSmolLM2 evidence: {e.to_json()}\n(total {time.perf_counter() - t0:.1f} s)")
    assert e.top1_agreement > 0.8 and e.ppl_ratio < 1.15 and e.mean_kl < 0.1
    assert e.memory_ratio < 0.75        # blocks at 1 byte/weight; embeddings stay fp32
    assert_bitwise_equal(model, snap)
    assert torch.equal(logits(model, ids), base)
