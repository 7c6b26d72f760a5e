"""Verification: which drafted tokens the verifier keeps, and the token it adds.

The verifier ran one forward over the drafted tokens; row i of its logits predicts the token
after `seq + drafts[:i]` (n drafts -> n + 1 rows). Both rules return (m, token): the first m
drafts are kept and `token` follows them, so every verify forward emits m + 1 tokens.

- greedy: m = the longest prefix of drafts equal to the verifier's own argmax; token = the
  verifier's argmax after it. The output is the verifier's greedy output, token for token.
- sampling (Leviathan et al. 2023, Chen et al. 2023): draft x_i ~ q_i is kept with probability
  min(1, p_i(x_i) / q_i(x_i)); the first rejected one is replaced by a sample of
  norm(max(0, p_i - q_i)); if all are kept, token ~ p_n. Each emitted token is then distributed
  exactly as p (the verifier's processed distribution), whatever q is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# (prefix ids [1, T], scores [1, V]) -> scores [1, V]: transformers' LogitsProcessorList shape.
Processor = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Sampler:
    """How the verifier turns logits into a token: processors (temperature, top-k, min length,
    ...) then argmax, or a sample when `do_sample`."""
    processor: Optional[Processor] = None
    do_sample: bool = False
    generator: Optional[torch.Generator] = None

    def scores(self, prefix: Tensor, logits: Tensor) -> Tensor:
        """prefix [1, T], logits [V] -> processed scores [V], float32."""
        s = logits.float().unsqueeze(0)                                 # [1, V]
        if self.processor is not None:
            s = self.processor(prefix, s)
        return s[0]

    def rand(self, device: torch.device) -> float:
        return float(torch.rand((), generator=self.generator, device=self._gen_device(device)))

    def sample(self, probs: Tensor) -> int:
        """probs [V] -> one token id."""
        dev = self._gen_device(probs.device)
        return int(torch.multinomial(probs.to(dev), 1, generator=self.generator))

    def _gen_device(self, device: torch.device) -> torch.device:
        return self.generator.device if self.generator is not None else device


def verify_greedy(seq: Tensor, drafts: Tensor, logits: Tensor, sampler: Sampler) -> tuple[int, int]:
    """seq [1, T], drafts [n], logits [n + 1, V] -> (m kept, the verifier's next token)."""
    n = drafts.shape[0]
    for i in range(n + 1):
        prefix = torch.cat([seq, drafts[:i].view(1, -1)], dim=1)       # [1, T + i]
        target = int(sampler.scores(prefix, logits[i]).argmax())
        if i == n or int(drafts[i]) != target:
            return i, target
    raise AssertionError("unreachable: the loop returns at i == n")


def verify_sampled(seq: Tensor, drafts: Tensor, draft_probs: Optional[Tensor], logits: Tensor,
                   sampler: Sampler) -> tuple[int, int]:
    """seq [1, T], drafts [n], draft_probs [n, V] (None: each draft was certain, q = one-hot),
    logits [n + 1, V] -> (m kept, the next token), by the standard acceptance rule."""
    n = drafts.shape[0]
    for i in range(n + 1):
        prefix = torch.cat([seq, drafts[:i].view(1, -1)], dim=1)       # [1, T + i]
        p = torch.softmax(sampler.scores(prefix, logits[i]), dim=-1)   # [V]
        if i == n:
            return n, sampler.sample(p)
        x = int(drafts[i])
        q = _draft_row(draft_probs, i, x, p)                           # [V]
        if sampler.rand(p.device) * float(q[x]) < float(p[x]):         # u < p(x) / q(x)
            continue
        return i, sampler.sample(_residual(p, q))
    raise AssertionError("unreachable: the loop returns at i == n")


def _draft_row(draft_probs: Optional[Tensor], i: int, x: int, like: Tensor) -> Tensor:
    if draft_probs is not None:
        return draft_probs[i].to(like.device, torch.float32)
    q = torch.zeros_like(like)
    q[x] = 1.0
    return q


def _residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)) [V]; p itself when rounding left nothing (then p == q)."""
    r = (p - q).clamp_min(0)
    total = float(r.sum())
    return r / total if total > 0 else p
