"""Device-side reductions for a traced request: every function returns tensors on the input's
device and never synchronises with the host (no .item(), no data-dependent shapes).

Padding: `valid` arguments are bool masks over tokens (True = real token), [B, T] or, for
selected queries, [B, n]; None means every token is real. Pad positions are dropped with
torch.where (never multiplied away: a pad row may hold NaN, e.g. a fully masked softmax).
Counts of what was averaged come back as device tensors when a mask is given (data-dependent),
as host ints otherwise.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from headroom_sidecar.agent.adapters.base import WeightLayout

# Cap on elements that go into the |activation| quantiles (torch.quantile sorts its input).
MAX_QUANTILE_ELEMENTS = 1 << 16

Count = Union[int, torch.Tensor]   # host int without a mask, 0-dim device tensor with one


def query_subsample(t_q: int, max_queries: int, device: torch.device) -> torch.Tensor:
    """Indices of at most max_queries query positions, evenly spaced, always including the last."""
    if t_q <= max_queries:
        return torch.arange(t_q, device=device)
    return torch.linspace(0, t_q - 1, max_queries, device=device).round().long()


def _masked_sum(x: torch.Tensor, valid: Optional[torch.Tensor], dims) -> torch.Tensor:
    """x summed over dims, entries where `valid` (broadcast against x) is False counted as 0."""
    if valid is not None:
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(dims)


def _count(valid: Optional[torch.Tensor], total: int) -> Count:
    return total if valid is None else valid.sum()


def row_stats(p: torch.Tensor, valid_q: Optional[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, Count]:
    """Entropy (nats) and max weight of attention rows, summed over batch and valid queries.

    p [B, H, n, S]: the scored queries' attention probabilities; valid_q [B, n] drops pad
    queries. Returns two [H] float32 tensors and the number of rows summed.
    """
    p = p.float()
    entropy = torch.special.entr(p).sum(-1)                          # [B, H, n]; entr(0) = 0
    keep = None if valid_q is None else valid_q[:, None, :]          # [B, 1, n]
    return (_masked_sum(entropy, keep, (0, 2)), _masked_sum(p.amax(-1), keep, (0, 2)),
            _count(valid_q, p.shape[0] * p.shape[2]))


def attention_stats(q: torch.Tensor, k: torch.Tensor, query_idx: torch.Tensor, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and max weight [H] of plain causal attention (no mask), summed over B and queries."""
    entropy, max_weight, _ = row_stats(attention_probs(q, k, query_idx, scale), None)
    return entropy, max_weight


def attention_probs(q: torch.Tensor, k: torch.Tensor, query_idx: torch.Tensor, scale: float,
                    softcap: Optional[float] = None, mask: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Softmax attention of the selected queries, re-derived as an eager attention computes it.

    q [B, H, Tq, D] are the last Tq of the S positions in k [B, KVH, S, D] (after the model's
    q/k norms and positional encoding). mask: the 4D mask the model passed to its attention,
    [B|1, 1|H, Tq, >=S], bool (True = attend) or additive; None = plain causal. Returns
    [B, H, n, S] float32 (a fully masked row, i.e. a pad query, is NaN).
    """
    b, h, t_q, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    q_sel = q.index_select(2, query_idx).float()                     # [B, H, n, D]
    n = q_sel.shape[2]
    # Group query heads by KV head instead of copying k over the group: head = kv * G + g.
    q_grp = q_sel.view(b, kvh, h // kvh, n, d)                      # [B, KVH, G, n, D]
    scores = q_grp @ k.float().unsqueeze(2).transpose(-1, -2)        # [B, KVH, G, n, S]
    scores = scores.view(b, h, n, s) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        q_pos = query_idx + (s - t_q)                                # absolute positions [n]
        future = torch.arange(s, device=q.device)[None, :] > q_pos[:, None]  # [n, S]
        scores = scores.masked_fill(future, -math.inf)
    else:
        m = mask.index_select(2, query_idx)[..., :s]                 # [B|1, 1|H, n, S]
        scores = scores.masked_fill(~m, -math.inf) if m.dtype == torch.bool else scores + m.float()
    return scores.softmax(dim=-1)


def head_output_norms(o_in: torch.Tensor, weight: torch.Tensor, layout: WeightLayout,
                      num_heads: int, head_dim: int, token_idx: Optional[torch.Tensor],
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per head, the norm of its contribution to o_proj's output, summed over real tokens: [H].

    o_in [B, T, H * D] is o_proj's input (heads concatenated, head-major); head h contributes
    o_in[..., h] @ (its D input rows of the weight). valid [B, n] (n = selected tokens).
    """
    x = o_in if token_idx is None else o_in.index_select(1, token_idx)
    x = x.unflatten(-1, (num_heads, head_dim)).float()               # [B, n, H, D]
    w = weight.float()
    if layout is WeightLayout.OUT_IN:                                # [hidden, H * D]
        per_head = torch.einsum("bnhd,ohd->bnho", x, w.view(-1, num_heads, head_dim))
    else:                                                            # [H * D, hidden]
        per_head = torch.einsum("bnhd,hdo->bnho", x, w.view(num_heads, head_dim, -1))
    norms = per_head.norm(dim=-1)                                    # [B, n, H]
    return _masked_sum(norms, None if valid is None else valid[..., None], (0, 1))


def influence_sum(x_in: torch.Tensor, x_out: torch.Tensor,
                  valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Count]:
    """Sum over real tokens of 1 - cos(block input, block output): (scalar float32, count)."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
    return _masked_sum(1.0 - cos, valid, (0, 1)), _count(valid, cos.numel())


def activation_stats(a: torch.Tensor, thresholds: torch.Tensor, quantiles: tuple[float, ...],
                     max_elements: int = MAX_QUANTILE_ELEMENTS,
                     valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, Count]:
    """|a| counts below each threshold [nT] and |a| quantiles [nQ], over at most max_elements.

    a [B, T, I]; valid [B, T] drops pad tokens. Returns (counts, quantiles, n) with n the number
    of elements looked at. Subsampling takes every k-th element, deterministic and cheap. One
    sort serves both: counts by binary search, quantiles by linear interpolation (numpy's
    default). Pad elements become +inf, so they sort last and are below no threshold; their
    number is then only known on the device, and so are the quantile ranks.
    """
    mag = a.detach().abs().float()
    if valid is not None:
        mag = mag.masked_fill(~valid[..., None], math.inf)           # [B, T, I]
    flat = mag.reshape(-1)
    step = max(1, math.ceil(flat.numel() / max_elements))
    ordered = flat[::step].sort().values                             # [m]
    counts = torch.searchsorted(ordered, thresholds).float()         # elements < threshold
    if valid is None:
        return counts, _host_rank_quantiles(ordered, quantiles), ordered.numel()
    n = torch.isfinite(ordered).sum()                                # real elements, 0-dim
    return counts, _device_rank_quantiles(ordered, quantiles, n), n


def _host_rank_quantiles(ordered: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    # Python scalars, not device tensors: building index tensors would copy host -> device.
    n, values = ordered.numel(), []
    for q in quantiles:
        rank = q * (n - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        values.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))
    return torch.stack(values)


def _device_rank_quantiles(ordered: torch.Tensor, quantiles: tuple[float, ...],
                           n: torch.Tensor) -> torch.Tensor:
    """Quantiles of the first n (a device count) entries of ordered; 0 where n == 0."""
    last = (n - 1).clamp(min=0).float()
    values = []
    for q in quantiles:
        rank = last * q                                              # 0-dim, on the device
        lo, hi = rank.floor().long().view(1), rank.ceil().long().view(1)
        v_lo, v_hi = ordered.gather(0, lo), ordered.gather(0, hi)
        values.append((v_lo + (v_hi - v_lo) * (rank - lo.float())).squeeze(0))
    out = torch.stack(values)
    return torch.where(n > 0, out, torch.zeros_like(out))
