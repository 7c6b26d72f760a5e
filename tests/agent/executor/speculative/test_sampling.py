"""The sampling rule keeps the verifier's distribution, whatever the draft proposes."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.executor.speculative.verify import Sampler, verify_sampled

V, N, TV_MAX = 6, 20_000, 0.02


def _dists(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)       # a different draft
    return p, q


def _first_tokens(p: torch.Tensor, q: torch.Tensor | None, fixed: int | None) -> torch.Tensor:
    """N one-step trials: draft x (~q, or the certain token `fixed`), verify, keep the first
    emitted token."""
    g = torch.Generator().manual_seed(1234)
    sampler = Sampler(do_sample=True, generator=g)
    logits = torch.log(p).expand(2, V)                                  # [n + 1, V]
    seq = torch.zeros(1, 1, dtype=torch.long)
    counts = torch.zeros(V)
    for _ in range(N):
        x = fixed if fixed is not None else int(torch.multinomial(q, 1, generator=g))
        m, nxt = verify_sampled(seq, torch.tensor([x]), None if q is None else q.view(1, V),
                                logits, sampler)
        counts[x if m == 1 else nxt] += 1
    return counts / N


@pytest.mark.parametrize("seed", (0, 1))
def test_sampled_draft_keeps_the_verifier_distribution(seed):
    p, q = _dists(seed)
    assert 0.5 * (p - q).abs().sum() > 0.2                             # q is far from p
    got = _first_tokens(p, q, None)
    assert 0.5 * (got - p).abs().sum() < TV_MAX


def test_certain_draft_keeps_the_verifier_distribution():
    """Prompt lookup: q is one-hot at the copied token."""
    p, _ = _dists(2)
    got = _first_tokens(p, None, fixed=int(p.argmin()))
    assert 0.5 * (got - p).abs().sum() < TV_MAX


def test_acceptance_boundaries():
    """p(x) == q(x): always kept (u < 1); p(x) == 0: never kept."""
    g = torch.Generator().manual_seed(0)
    sampler = Sampler(do_sample=True, generator=g)
    seq = torch.zeros(1, 1, dtype=torch.long)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    logits = torch.log(p).expand(2, 4)
    for _ in range(200):
        assert verify_sampled(seq, torch.tensor([1]), p.view(1, 4), logits, sampler)[0] == 1
        m, nxt = verify_sampled(seq, torch.tensor([2]), None, logits, sampler)
        assert m == 0 and nxt in (0, 1)
