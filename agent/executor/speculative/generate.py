"""The speculative loop: draft k, verify in one forward, keep the agreed prefix, repeat.

Invariant between rounds: the verifier's cache holds every token of `seq` but the last
(`seq` [1, T], cache length T - 1); the last token is fed with the next round's drafts. A
round feeds seq's unfed tail + n drafts, so the cache grows to T + n; keeping m drafts and the
verifier's own next token crops it back to T + m = the new T - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from headroom_sidecar.agent.executor.speculative.draft import Drafter
from headroom_sidecar.agent.executor.speculative.model_io import forward_logits, new_cache
from headroom_sidecar.agent.executor.speculative.verify import Sampler, verify_greedy, verify_sampled

StopFn = Callable[[Tensor], bool]     # seq [1, T] -> stop after its last token


@dataclass
class SpecStats:
    accepted: int = 0          # drafted tokens the verifier kept
    proposed: int = 0          # drafted tokens offered to the verifier
    verify_forwards: int = 0   # verifier forwards (one per round; the first is the prefill)
    emitted: int = 0           # tokens returned

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted / self.verify_forwards if self.verify_forwards else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def add(self, other: "SpecStats") -> None:
        self.accepted += other.accepted
        self.proposed += other.proposed
        self.verify_forwards += other.verify_forwards
        self.emitted += other.emitted


@torch.no_grad()
def speculative_generate(model: nn.Module, ids: Tensor, max_new_tokens: int, drafter: Drafter,
                         k: int, *, sampler: Optional[Sampler] = None,
                         stop: Optional[StopFn] = None,
                         eos_token_id: Optional[int] = None) -> tuple[Tensor, SpecStats]:
    """ids [1, T] -> (new tokens [N <= max_new_tokens], stats). Greedy by default: the tokens
    are the verifier's own greedy continuation; with `sampler.do_sample` they are distributed
    as the verifier's samples."""
    _check_args(ids, max_new_tokens, k)
    sampler = sampler or Sampler()
    stats, seq, prompt_len = SpecStats(), ids, ids.shape[1]
    cache, fed = new_cache(model), 0                     # fed = positions the cache holds
    drafter.reset()
    try:
        while seq.shape[1] - prompt_len < max_new_tokens:
            room = max_new_tokens - (seq.shape[1] - prompt_len)
            seq, fed, done = _round(model, seq, fed, cache, drafter, min(k, room - 1), sampler,
                                    stats, _stopper(stop, eos_token_id))
            if done:
                break
    finally:
        drafter.reset()                                  # frees the draft's cache
    out = seq[0, prompt_len:prompt_len + max_new_tokens]
    stats.emitted = out.shape[0]
    return out, stats


def _round(model, seq, fed, cache, drafter, k, sampler, stats, stop):
    """One draft + verify round -> (seq, positions cached, stop reached)."""
    drafts = drafter.propose(seq, k, sampler) if k > 0 else None
    tokens = drafts.tokens[:k].to(seq.device) if drafts is not None else seq.new_zeros(0)
    n = tokens.shape[0]
    feed = torch.cat([seq[:, fed:], tokens.view(1, -1)], dim=1)        # [1, T - fed + n]
    logits = forward_logits(model, feed, cache, n + 1)                  # [n + 1, V]
    if sampler.do_sample:
        probs = drafts.probs[:n] if drafts is not None and drafts.probs is not None else None
        m, nxt = verify_sampled(seq, tokens, probs, logits, sampler)
    else:
        m, nxt = verify_greedy(seq, tokens, logits, sampler)
    stats.verify_forwards += 1
    stats.proposed += n
    stats.accepted += m
    if n > m:
        cache.crop(m - n)                                               # drop rejected positions
    new = torch.cat([tokens[:m], tokens.new_tensor([nxt])])             # [m + 1]
    for i in range(new.shape[0]):                                       # stop where generate would
        seq = torch.cat([seq, new[i].view(1, 1)], dim=1)
        if stop(seq):
            return seq, seq.shape[1] - 1, True
    return seq, seq.shape[1] - 1, False


def _stopper(stop: Optional[StopFn], eos: Optional[int]) -> StopFn:
    def check(seq: Tensor) -> bool:
        return (eos is not None and int(seq[0, -1]) == eos) or (stop is not None and stop(seq))
    return check


def _check_args(ids: Tensor, max_new_tokens: int, k: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"speculative_generate: ids must be [1, T>=1], got {list(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"speculative_generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if k < 0:
        raise ValueError(f"speculative_generate: k must be >= 0, got {k}")
