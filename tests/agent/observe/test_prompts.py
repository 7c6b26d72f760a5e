"""The recent prompts per query class that class trials measure on: bounded, newest first,
and recorded only for labelled single-sequence requests that ran without padding."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.observe.prompts import MAX_CLASSES, MAX_PROMPT_TOKENS, RecentPrompts
from headroom_sidecar.agent.settings import AgentSettings
from tests.builders import tiny_llama, token_ids


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor([list(values)])                                 # [1, T]


def test_newest_first_per_class_bounded():
    r = RecentPrompts(per_class=2)
    for i in range(3):
        r.add("code", _ids(i, i))
    r.add("chat", _ids(9))
    assert [p.tolist() for p in r.newest(["code"], 5)] == [[2, 2], [1, 1]]     # the oldest went
    assert [p.tolist() for p in r.newest(["chat", "code"], 2)] == [[9], [2, 2]]
    assert r.newest(["docs"], 3) == [] and r.newest(["code"], 0) == []


def test_long_prompts_keep_their_tail_and_classes_are_bounded():
    r = RecentPrompts(per_class=1)
    r.add("code", torch.arange(MAX_PROMPT_TOKENS + 5).unsqueeze(0))
    (kept,) = r.newest(["code"], 1)
    assert kept.shape == (MAX_PROMPT_TOKENS,) and kept[0].item() == 5
    for i in range(MAX_CLASSES):                  # one class too many: the least recent goes
        r.add(f"c{i}", _ids(i))
    assert len(r.counts()) == MAX_CLASSES and "code" not in r.counts() and "c0" in r.counts()


def test_a_copy_is_kept_not_the_callers_tensor():
    r, ids = RecentPrompts(per_class=1), _ids(1, 2, 3)
    r.add("code", ids)
    ids[0, 0] = 7
    assert r.newest(["code"], 1)[0].tolist() == [1, 2, 3]


def test_zero_keeps_nothing():
    r = RecentPrompts(per_class=0)
    r.add("code", _ids(1))
    assert r.counts() == {}


@pytest.fixture
def handle():
    model = tiny_llama()
    settings = AgentSettings(export_enabled=False, sample_rate=0.0, guard_every_n_requests=0,
                             recent_prompts_per_class=4)
    h = AgentHandle(model, resolve_structure(model), settings, sink=lambda rec: None)
    yield h
    h.detach()


def _generate(h: AgentHandle, ids: torch.Tensor, mask: torch.Tensor, query_class: str) -> None:
    with h.request(query_class=query_class):
        h.model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                         pad_token_id=0)


def test_only_labelled_unpadded_single_sequences_are_kept(handle):
    one = token_ids(6, seed=1)                                               # [1, 6]
    _generate(handle, one, torch.ones_like(one), "code")
    _generate(handle, token_ids(5, seed=2), torch.ones(1, 5, dtype=torch.long), "")   # no class
    padded = torch.ones(1, 7, dtype=torch.long)
    padded[0, :2] = 0                                                        # left padding
    _generate(handle, token_ids(7, seed=3), padded, "code")
    two = torch.cat([token_ids(4, seed=4), token_ids(4, seed=5)])             # [2, 4]
    _generate(handle, two, torch.ones_like(two), "code")
    kept = handle._tracker.recent_prompts
    assert kept.counts() == {"code": 1}
    assert kept.newest(["code"], 4)[0].tolist() == one[0].tolist()
