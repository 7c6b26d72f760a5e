"""The recent prompts of each query class, for trials that measure on the class's own traffic.

The request tracker adds the prompt of every finished request that has a query class, one
sequence and no padding (a copy of the first forward's input ids, taken when the request
ends, not on the forward path); a trial whose eval set asks for `traffic_prompts` takes the newest of the plan's
classes instead of the eval set's prompts (agent/control.py). Prompts stay in this process:
nothing here is exported, logged or stored. Bounded: `per_class` prompts of at most
MAX_PROMPT_TOKENS tokens (the tail is kept) for at most MAX_CLASSES classes (least recently
added class dropped first).
"""
from __future__ import annotations

import collections
import threading
from typing import Iterable

import torch

MAX_CLASSES = 64
MAX_PROMPT_TOKENS = 1024


class RecentPrompts:
    def __init__(self, per_class: int):
        self.per_class = per_class
        self._by_class: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, query_class: str, ids: torch.Tensor) -> None:
        """ids [1, T] (or [T]) token ids of one prompt."""
        if self.per_class <= 0 or not query_class:
            return
        with self._lock:
            kept = self._by_class.pop(query_class, None)
            kept = kept if kept is not None else collections.deque(maxlen=self.per_class)
            kept.append(ids.detach().reshape(-1)[-MAX_PROMPT_TOKENS:].clone())
            self._by_class[query_class] = kept
            while len(self._by_class) > MAX_CLASSES:
                self._by_class.popitem(last=False)

    def newest(self, classes: Iterable[str], n: int) -> list[torch.Tensor]:
        """Up to n prompts of `classes` (each [T], on the CPU), newest first."""
        with self._lock:
            found = [p for c in classes for p in reversed(self._by_class.get(c, ()))]
        return [p.to("cpu") for p in found[:n]]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {c: len(q) for c, q in self._by_class.items()}
