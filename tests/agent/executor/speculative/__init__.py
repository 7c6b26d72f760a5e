"""Shared pieces of the speculative tests: execution documents and reference drafters."""
from __future__ import annotations

import torch

from headroom_sidecar.agent.executor.speculative.draft import Proposal


def execution(spec: dict | None = None, static: bool = False, compile: str = "none") -> dict:
    doc = {"kind": "execution", "static_kv_cache": static, "compile": compile}
    if spec is not None:
        doc["speculative"] = spec
    return doc


def self_spec(k: int, *transforms: dict) -> dict:
    return {"draft": "self", "k": k, "draft_plan": {"transforms": list(transforms)}}


INT8_ALL = {"kind": "weight_precision", "layers": {"0": "int8", "1": "int8", "2": "int8"}}
SKIP_1 = {"kind": "skip_layers", "layers": [1]}


class ScriptedDrafter:
    """Proposes from a known continuation `truth` [N] of the prompt: exact, or each token
    shifted by one (always wrong), or wrong at every `wrong_every`-th proposal position."""

    def __init__(self, prompt_len: int, truth: torch.Tensor, vocab: int, wrong_every: int = 0,
                 always_wrong: bool = False):
        self.prompt_len, self.truth, self.vocab = prompt_len, truth, vocab
        self.wrong_every, self.always_wrong = wrong_every, always_wrong
        self.calls = 0

    def reset(self) -> None:
        pass

    def propose(self, seq: torch.Tensor, k: int, sampler=None) -> Proposal:
        self.calls += 1
        done = seq.shape[1] - self.prompt_len
        out = self.truth[done:done + k].clone()                          # [<= k]
        if self.always_wrong:
            out = (out + 1) % self.vocab
        elif self.wrong_every and self.calls % self.wrong_every == 0 and out.numel() > 1:
            out[out.numel() // 2] = (out[out.numel() // 2] + 1) % self.vocab
        return Proposal(out)
