"""Device-side reductions for a traced request: every function returns tensors on the input's
device and never synchronises with the host (no .item(), no data-dependent shapes)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from agent.adapters.base import WeightLayout

# Cap on elements that go into the |activation| quantiles (torch.quantile sorts its input).
MAX_QUANTILE_ELEMENTS = 1 << 16


def query_subsample(t_q: int, max_queries: int, device: torch.device) -> torch.Tensor:
    """Indices of at most max_queries query positions, evenly spaced, always including the last."""
    if t_q <= max_queries:
        return torch.arange(t_q, device=device)
    return torch.linspace(0, t_q - 1, max_queries, device=device).round().long()


def attention_stats(q: torch.Tensor, k: torch.Tensor, query_idx: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and max weight of causal softmax attention, summed over batch and queries.

    q [B, H, Tq, D] are the last Tq of the S positions in k [B, KVH, S, D]; query_idx picks
    which of the Tq queries to score. Returns two [H] tensors (float32).
    """
    b, h, t_q, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    q_sel = q.index_select(2, query_idx).float()                     # [B, H, n, D]
    n = q_sel.shape[2]
    # Group query heads by KV head instead of copying k over the group: head = kv * G + g.
    q_grp = q_sel.view(b, kvh, h // kvh, n, d)                      # [B, KVH, G, n, D]
    scores = q_grp @ k.float().unsqueeze(2).transpose(-1, -2)        # [B, KVH, G, n, S]
    scores = scores.view(b, h, n, s) * scale
    q_pos = query_idx + (s - t_q)                                    # absolute positions [n]
    future = torch.arange(s, device=q.device)[None, :] > q_pos[:, None]  # [n, S]
    probs = scores.masked_fill(future, -math.inf).softmax(dim=-1)   # [B, H, n, S]
    entropy = torch.special.entr(probs).sum(-1)                      # [B, H, n]; entr(0) = 0
    return entropy.sum((0, 2)), probs.amax(-1).sum((0, 2))


def head_output_norms(o_in: torch.Tensor, weight: torch.Tensor, layout: WeightLayout,
                      num_heads: int, head_dim: int, token_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Per head, the norm of its contribution to o_proj's output, summed over tokens: [H].

    o_in [B, T, H * D] is o_proj's input (heads concatenated, head-major); head h contributes
    o_in[..., h] @ (its D input rows of the weight).
    """
    x = o_in if token_idx is None else o_in.index_select(1, token_idx)
    x = x.reshape(-1, num_heads, head_dim).float()                   # [N, H, D]
    w = weight.float()
    if layout is WeightLayout.OUT_IN:                                # [hidden, H * D]
        per_head = torch.einsum("nhd,ohd->nho", x, w.view(-1, num_heads, head_dim))
    else:                                                            # [H * D, hidden]
        per_head = torch.einsum("nhd,hdo->nho", x, w.view(num_heads, head_dim, -1))
    return per_head.norm(dim=-1).sum(0)                              # [H]


def influence_sum(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of 1 - cos(block input, block output); scalar (float32)."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
    return (1.0 - cos).sum()


def activation_stats(a: torch.Tensor, thresholds: torch.Tensor, quantiles: tuple[float, ...],
                     max_elements: int = MAX_QUANTILE_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """|a| counts below each threshold [nT] and |a| quantiles [nQ], over at most max_elements.

    Returns (counts, quantiles, n) with n the number of elements looked at (known on the host).
    Subsampling takes every k-th element, deterministic and cheap. One sort serves both: counts
    by binary search, quantiles by linear interpolation (numpy's default) at host-known ranks.
    """
    flat = a.detach().reshape(-1)
    step = max(1, math.ceil(flat.numel() / max_elements))
    ordered = flat[::step].abs().float().sort().values               # [n]
    n = ordered.numel()
    counts = torch.searchsorted(ordered, thresholds).float()         # elements < threshold
    # Python scalars, not device tensors: building index tensors would copy host -> device.
    values = []
    for q in quantiles:
        rank = q * (n - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        values.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))
    return counts, torch.stack(values), n
