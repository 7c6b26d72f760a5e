"""prune_heads: physically removed heads equal zeroing those heads' o_proj input slices."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.executor.prune import PrunedAttention, ZeroAttention, kv_grouping
from tests.agent.executor import HeadZeroHooks, greedy, logits, plan, rig
from tests.builders import tiny_llama, tiny_mistral, tiny_qwen2

CASES = {
    # name: (builder kwargs, heads pruned per layer)
    "mha": (dict(heads=4, kv_heads=4), {0: [1], 2: [0, 3]}),
    "gqa-even": (dict(heads=8, kv_heads=2), {0: [0, 4], 1: [1, 2, 5, 6]}),
    "gqa-uneven": (dict(heads=8, kv_heads=2), {0: [0], 1: [1, 2, 7], 2: [5]}),
    "gqa-whole-kv-group": (dict(heads=8, kv_heads=2), {1: [0, 1, 2, 3], 2: [4, 5, 6, 7, 0]}),
    "layer-all-heads": (dict(heads=4, kv_heads=2), {1: [0, 1, 2, 3], 0: [2]}),
}


def _doc(heads):
    return {"kind": "prune_heads", "heads": {str(k): v for k, v in heads.items()}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_equals_zeroed_head_reference(case):
    kwargs, heads = CASES[case]
    r = rig(tiny_llama(**kwargs))
    with HeadZeroHooks(r.structure, heads):
        ref = logits(r.model)
    base = logits(r.model)
    r.executor.apply(plan(r.fingerprint, _doc(heads)))
    out = logits(r.model)
    assert not torch.allclose(out, base, atol=1e-4)      # pruning did something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_after_pruning_matches_reference(case, cache):
    kwargs, heads = CASES[case]
    r = rig(tiny_llama(**kwargs))
    with HeadZeroHooks(r.structure, heads):
        ref = greedy(r.model, cache_implementation=cache)
    r.executor.apply(plan(r.fingerprint, _doc(heads)))
    assert torch.equal(greedy(r.model, cache_implementation=cache), ref)


def test_structure_really_shrinks():
    r = rig(tiny_llama(heads=8, kv_heads=2))
    r.executor.apply(plan(r.fingerprint, _doc({1: [0, 1, 2, 3, 5], 2: [0, 1, 2, 3, 4, 5, 6, 7]})))
    attn = r.structure.layers[1].self_attn
    assert isinstance(attn, PrunedAttention)
    assert attn.q_proj.weight.shape[0] == 3 * 8 and attn.k_proj.weight.shape[0] == 1 * 8
    assert attn.o_proj.weight.shape[1] == 3 * 8 and attn.kept_kv_heads == (1,)
    assert isinstance(r.structure.layers[2].self_attn, ZeroAttention)


@pytest.mark.parametrize("kept,group,expect", [
    ([0, 1, 2, 3], 2, ([0, 1], [0, 0, 1, 1], 2)),
    ([0, 2, 3], 2, ([0, 1], [0, 1, 1], 0)),            # uneven: index map
    ([4, 5, 6], 4, ([1], [0, 0, 0], 3)),               # KV group 0 gone
])
def test_kv_grouping(kept, group, expect):
    assert kv_grouping(kept, group) == expect


@pytest.mark.parametrize("builder", [tiny_qwen2, tiny_mistral])
def test_other_llama_family_members(builder):
    r = rig(builder())
    heads = {0: [1], 2: [0, 1]}
    with HeadZeroHooks(r.structure, heads):
        ref = logits(r.model)
    r.executor.apply(plan(r.fingerprint, _doc(heads)))
    torch.testing.assert_close(logits(r.model), ref, atol=1e-5, rtol=1e-4)
