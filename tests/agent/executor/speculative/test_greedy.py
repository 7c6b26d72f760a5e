"""Greedy speculation returns exactly the verifier's greedy output, and counts what it did."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.executor.speculative import PromptLookupDrafter, Sampler, SelfDrafter, speculative_generate
from headroom_sidecar.agent.executor.speculative.install import build_draft
from headroom_sidecar.proto.plan import Plan
from tests.agent.executor import plan_doc, rig
from tests.agent.executor.speculative import INT8_ALL, SKIP_1, ScriptedDrafter
from tests.builders import ARCH_BUILDERS, token_ids

ARCHS = ("llama", "qwen2")
NEW = 20


def _prompt() -> torch.Tensor:
    ids = token_ids(10, seed=5)
    return torch.cat([ids, ids[:, :6]], dim=1)           # [1, 16]: a repeat for n-grams to find


@torch.no_grad()
def _plain(model, ids: torch.Tensor, n: int = NEW) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:]                                       # [n]


def _self_drafter(model, *transforms: dict) -> SelfDrafter:
    r = rig(model)
    parsed = Plan.from_doc(plan_doc(r.fingerprint, *transforms)).ordered()
    return SelfDrafter(model, build_draft(r.executor, tuple(parsed)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", (1, 4))
@pytest.mark.parametrize("draft", ("prompt_lookup", "self_int8", "self_skip1"))
def test_greedy_equals_plain_generate(arch, k, draft):
    model = ARCH_BUILDERS[arch]()
    ids = _prompt()
    ref = _plain(model, ids)
    drafter = {"prompt_lookup": lambda: PromptLookupDrafter(),
               "self_int8": lambda: _self_drafter(model, INT8_ALL),
               "self_skip1": lambda: _self_drafter(model, SKIP_1)}[draft]()
    out, stats = speculative_generate(model, ids, NEW, drafter, k)
    assert torch.equal(out, ref)
    assert stats.emitted == NEW and stats.accepted <= stats.proposed
    assert stats.verify_forwards == NEW - stats.accepted      # each round: kept drafts + 1


@pytest.mark.parametrize("k", (1, 4))
def test_own_tokens_are_all_accepted(k):
    model = ARCH_BUILDERS["llama"]()
    ids = _prompt()
    ref = _plain(model, ids)
    out, stats = speculative_generate(model, ids, NEW, ScriptedDrafter(16, ref, 128), k)
    assert torch.equal(out, ref)
    assert stats.accepted == stats.proposed > 0
    assert stats.verify_forwards == -(-NEW // (k + 1))        # k drafts + 1 per forward
    assert stats.tokens_per_verify == NEW / stats.verify_forwards


def test_garbage_is_never_accepted_and_output_stays_exact():
    model = ARCH_BUILDERS["llama"]()
    ids = _prompt()
    ref = _plain(model, ids)
    out, stats = speculative_generate(model, ids, NEW, ScriptedDrafter(16, ref, 128,
                                                                      always_wrong=True), 4)
    assert torch.equal(out, ref)
    assert stats.accepted == 0 and stats.proposed > 0
    assert stats.verify_forwards == NEW and stats.acceptance == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_stays_consistent_after_rejections(arch):
    """Partial rejections every other round for 48 tokens: one stale cache entry would
    change a later token."""
    model = ARCH_BUILDERS[arch]()
    ids, n = _prompt(), 48
    ref = _plain(model, ids, n)
    drafter = ScriptedDrafter(16, ref, 128, wrong_every=2)
    out, stats = speculative_generate(model, ids, n, drafter, 4)
    assert torch.equal(out, ref)
    assert 0 < stats.accepted < stats.proposed


def test_self_drafter_cache_rewinds_to_the_kept_prefix():
    """After rounds with rejections, the drafter's cached proposal equals a fresh one's."""
    model = ARCH_BUILDERS["llama"]()
    ids = _prompt()
    ref = _plain(model, ids, 24)
    drafter, fresh = _self_drafter(model, SKIP_1), _self_drafter(model, SKIP_1)
    greedy = Sampler()
    drafter.propose(ids, 4, greedy)
    for cut in (3, 5, 4, 12, 13):                    # back and forth, as rejections move it
        seq = torch.cat([ids, ref[:cut].view(1, -1)], dim=1)
        fresh.reset()
        assert torch.equal(drafter.propose(seq, 4, greedy).tokens, fresh.propose(seq, 4, greedy).tokens)


def test_stops_at_eos_where_generate_does():
    model = ARCH_BUILDERS["llama"]()
    ids = _prompt()
    ref = _plain(model, ids)
    eos = int(ref[7])
    first = int((ref == eos).nonzero()[0])
    out, _ = speculative_generate(model, ids, NEW, PromptLookupDrafter(), 4, eos_token_id=eos)
    assert torch.equal(out, ref[:first + 1])


def test_bad_arguments_say_what():
    model = ARCH_BUILDERS["llama"]()
    with pytest.raises(ValueError, match=r"ids must be \[1, T>=1\]"):
        speculative_generate(model, token_ids(4, batch=2), 4, PromptLookupDrafter(), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        speculative_generate(model, token_ids(4), 0, PromptLookupDrafter(), 2)
    with pytest.raises(ValueError, match="ngram_min <= ngram_max"):
        PromptLookupDrafter(ngram_max=1, ngram_min=2)


def test_prompt_lookup_copies_after_the_latest_match():
    d = PromptLookupDrafter(ngram_max=2)
    seq = torch.tensor([[5, 6, 1, 5, 6, 2, 9, 5, 6]])
    assert d.propose(seq, 3).tokens.tolist() == [2, 9, 5]     # the latest "5 6" is followed by 2
    assert d.propose(torch.tensor([[1, 2, 3]]), 3).tokens.numel() == 0
    assert d.propose(torch.tensor([[4]]), 3).tokens.numel() == 0
