"""The padding-aware reductions of agent/observe/stats.py, at their edges."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headroom_sidecar.agent.observe import stats

THRESHOLDS = torch.tensor([0.5])


def test_pad_activations_count_nowhere_and_a_value_at_the_threshold_is_not_below():
    a = torch.tensor([[[0.5, -0.49], [0.0, 0.0]]])                    # [B=1, T=2, I=2]
    valid = torch.tensor([[True, False]])                             # token 1 is padding
    counts, q, n = stats.activation_stats(a, THRESHOLDS, (0.0, 0.5, 1.0), valid=valid)
    assert int(n) == 2 and counts.tolist() == [1.0]                   # only |-0.49| < 0.5
    np.testing.assert_allclose(q.numpy(), np.quantile([0.49, 0.5], [0.0, 0.5, 1.0]), atol=1e-7)


def test_masked_quantiles_match_numpy_on_the_real_tokens():
    g = torch.Generator().manual_seed(3)
    a, valid = torch.randn(2, 7, 5, generator=g), torch.rand(2, 7, generator=g) > 0.4
    _, q, n = stats.activation_stats(a, THRESHOLDS, (0.1, 0.5, 0.99), valid=valid)
    real = a[valid].abs().reshape(-1).numpy()
    assert int(n) == real.size
    np.testing.assert_allclose(q.numpy(), np.quantile(real, (0.1, 0.5, 0.99)), rtol=1e-6)


def test_an_all_pad_input_contributes_zero_not_nan():
    counts, q, n = stats.activation_stats(torch.ones(1, 2, 3), THRESHOLDS, (0.5, 0.99),
                                          valid=torch.zeros(1, 2, dtype=torch.bool))
    assert int(n) == 0 and counts.tolist() == [0.0] and q.tolist() == [0.0, 0.0]


def test_a_nan_pad_query_row_is_dropped():
    p = torch.tensor([[[[0.5, 0.5], [math.nan, math.nan]]]])          # [B=1, H=1, n=2, S=2]
    entropy, max_weight, n = stats.row_stats(p, torch.tensor([[True, False]]))
    assert int(n) == 1
    assert entropy.item() == pytest.approx(math.log(2)) and max_weight.item() == 0.5


def test_rederived_probabilities_honour_a_bool_and_an_additive_mask_alike():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)
    keep = torch.tensor([[False, True, False], [False, True, True], [True, True, True]])
    additive = torch.zeros(3, 3).masked_fill(~keep, torch.finfo(torch.float32).min)
    idx = torch.arange(3)
    p_bool = stats.attention_probs(q, k, idx, 0.5, mask=keep[None, None])
    p_add = stats.attention_probs(q, k, idx, 0.5, mask=additive[None, None])
    torch.testing.assert_close(p_bool, p_add)
    assert (p_bool[..., ~keep] == 0).all()
