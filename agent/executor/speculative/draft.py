"""Drafters: cheap guesses of the next k tokens, which the verifier then checks.

A drafter never decides the output; it only changes how many tokens one verify forward yields.
`propose(seq, k, sampler)` returns at most k tokens (fewer, or none, when it has no guess).

- PromptLookupDrafter: finds the latest earlier occurrence of the sequence's last n-gram
  (n = ngram_max down to ngram_min) and proposes the tokens that followed it. Free to run;
  pays off when the output copies from the prompt (code edits, summaries, retrieval answers).
- SelfDrafter: the same model object with a cheaper plan's modules swapped in (`DraftModules`,
  one set of weights: skipped layers and sparsity share the verifier's tensors; int8 adds its
  quantised copies). It keeps its own KV cache and crops it to the prefix the verifier kept.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
from torch import Tensor, nn

from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.agent.executor.speculative.model_io import forward_logits, new_cache
from headroom_sidecar.agent.executor.speculative.verify import Sampler


@dataclass
class Proposal:
    tokens: Tensor                    # [n <= k] int64, on the sequence's device
    probs: Optional[Tensor] = None    # [n, V]: the distribution each token was drawn from;
                                      # None: each token was certain (q = one-hot)


class Drafter(Protocol):
    def propose(self, seq: Tensor, k: int, sampler: Sampler) -> Proposal:
        """seq [1, T] (prompt + output so far) -> at most k guessed next tokens."""

    def reset(self) -> None:
        """Forget any state of the last sequence (a new request starts)."""


def _empty(seq: Tensor) -> Proposal:
    return Proposal(seq.new_zeros(0))


# Default n-gram lengths searched for. Not 1: a lone repeated token is weak evidence, and a
# wrong draft costs a verify forward wider than a plain step for one token.
NGRAM_MAX, NGRAM_MIN = 3, 2


class PromptLookupDrafter:
    def __init__(self, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"PromptLookupDrafter: need 1 <= ngram_min <= ngram_max, got "
                             f"ngram_min={ngram_min}, ngram_max={ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def reset(self) -> None:
        pass

    def propose(self, seq: Tensor, k: int, sampler: Sampler | None = None) -> Proposal:
        row = seq[0]                                                    # [T]
        t = row.shape[0]
        for n in range(min(self.ngram_max, t - 1), self.ngram_min - 1, -1):
            start = self._latest_match(row, n)
            if start is not None:
                return Proposal(row[start:start + k].clone())
        return _empty(seq)

    @staticmethod
    def _latest_match(row: Tensor, n: int) -> Optional[int]:
        """Where the tokens after the latest earlier occurrence of row's last n-gram start."""
        windows = row[:-1].unfold(0, n, 1)                              # [T - n, n]: all but the tail
        hits = (windows == row[-n:]).all(dim=1).nonzero().flatten()     # window starts
        return None if hits.numel() == 0 else int(hits[-1]) + n


class RecordingLog(UndoLog):
    """An UndoLog that also remembers each swap's new module, so the swaps can be replayed."""

    def __init__(self, park_device):
        super().__init__(park_device)
        self.swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, name, old, new

    def swap(self, parent: nn.Module, name: str, new: nn.Module, *, park: bool = True) -> nn.Module:
        old = super().swap(parent, name, new, park=park)
        self.swaps.append((parent, name, old, new))
        return old

    def set_attr(self, obj, name, value) -> None:
        raise TypeError(f"a draft plan changes modules only; it tried to set {name!r}")

    def del_attr(self, obj, name) -> None:
        raise TypeError(f"a draft plan changes modules only; it tried to delete {name!r}")


class DraftModules:
    """A draft plan's modules, in the model only inside `active()`; the verifier's otherwise.

    Built by applying the draft transforms into a RecordingLog parked on the model's own device
    (the verifier's modules never move), then undone: the model is the verifier at rest, and
    `active()` replays the recorded swaps with the draft's very objects (no transform re-run),
    putting the verifier's back on exit. Not thread-safe: the caller serialises requests.
    """

    def __init__(self, model: nn.Module, log: RecordingLog):
        self._swaps = list(log.swaps)
        log.undo()                          # the verifier at rest; `_swaps` keeps the draft
        self.extra_bytes = self._extra_bytes(model)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for parent, name, _, new in self._swaps:
            setattr(parent, name, new)
        try:
            yield
        finally:
            for parent, name, old, _ in reversed(self._swaps):
                setattr(parent, name, old)

    def fresh(self, model: nn.Module) -> bool:
        """Whether every module the draft replaces is still the model's (a re-applied plan
        builds new ones: then the draft must be rebuilt on them)."""
        live = {id(m) for m in model.modules()}
        return all(id(parent) in live and getattr(parent, name, None) is old
                   for parent, name, old, _ in self._swaps)

    def _extra_bytes(self, model: nn.Module) -> int:
        """Bytes of tensors only the draft holds (e.g. its int8 copies): the cost of a draft."""
        with self.active():
            draft = _tensors(model)
        rest = _tensors(model)
        return sum(x.numel() * x.element_size() for key, x in draft.items() if key not in rest)


def _tensors(model: nn.Module) -> dict[int, Tensor]:
    out = {}
    for m in model.modules():
        for x in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            out[id(x)] = x
        for x in vars(m).values():                # packed weights kept as plain attributes
            if isinstance(x, Tensor):
                out[id(x)] = x
    return out


class SelfDrafter:
    """The model under its draft plan, greedy (or sampled when the verifier samples)."""

    def __init__(self, model: nn.Module, modules: DraftModules, temperature: float = 1.0):
        self.model, self.modules, self.temperature = model, modules, temperature
        self._cache = None
        self._seen: Tensor | None = None      # [1, L]: the tokens the draft cache holds
        self.forwards = 0

    def reset(self) -> None:
        self._cache, self._seen = None, None

    def propose(self, seq: Tensor, k: int, sampler: Sampler) -> Proposal:
        if k <= 0:
            return _empty(seq)
        with self.modules.active():
            feed = self._rewind(seq)                                    # [1, >= 1]
            tokens, probs = [], []
            for _ in range(k):
                logits = forward_logits(self.model, feed, self._cache, 1)[0]   # [V]
                self.forwards += 1
                tok, q = self._pick(logits, sampler)
                tokens.append(tok)
                probs.append(q)
                feed = seq.new_tensor([[tok]])                          # [1, 1]
        drafted = seq.new_tensor(tokens)                                # [k]
        self._seen = torch.cat([seq, drafted[:-1].view(1, -1)], dim=1)  # the last one is unfed
        return Proposal(drafted, torch.stack(probs) if sampler.do_sample else None)

    def _rewind(self, seq: Tensor) -> Tensor:
        """Crops the draft cache to its longest prefix shared with `seq`; the tokens to feed."""
        if self._seen is None or self._cache is None:
            self._cache, self._seen = new_cache(self.model), seq[:, :0]
        n = min(self._seen.shape[1], seq.shape[1] - 1)      # feed at least one token
        same = (self._seen[0, :n] == seq[0, :n]).long().cumprod(0).sum()
        keep = int(same)
        if self._seen.shape[1] > keep:
            self._cache.crop(keep - self._seen.shape[1])
        return seq[:, keep:]

    def _pick(self, logits: Tensor, sampler: Sampler) -> tuple[int, Optional[Tensor]]:
        if not sampler.do_sample:
            return int(logits.argmax()), None
        q = torch.softmax(logits.float() / self.temperature, dim=-1)   # [V]
        return sampler.sample(q), q
