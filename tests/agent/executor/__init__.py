"""Shared pieces of the executor tests: a tiny model with its executor, plan documents, and
hook-based references computed on the UNmodified model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from headroom_sidecar.agent.adapters import ModelStructure, resolve_structure
from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.agent.fingerprint import fingerprint
from headroom_sidecar.proto.plan import Plan
from tests.builders import token_ids


@dataclass
class Rig:
    model: nn.Module
    structure: ModelStructure
    fingerprint: str
    executor: Executor


def rig(model: nn.Module, **executor_kwargs) -> Rig:
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    return Rig(model, s, fp, Executor(model, s, fp, **executor_kwargs))


def plan_doc(fp: str, *transforms: dict, plan_id: str = "p-test", mode: str = "structural") -> dict:
    return {"schema": "headroom.plan/v1", "plan_id": plan_id, "version": 1,
            "model_fingerprint": fp, "query_classes": [], "mode": mode,
            "transforms": list(transforms), "notes": ""}


def plan(fp: str, *transforms: dict, **kw) -> Plan:
    return Plan.from_doc(plan_doc(fp, *transforms, **kw))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    out = model(token_ids(12) if ids is None else ids)
    return getattr(out, "logits", out)      # transformers output, or a plain model's tensor


@torch.no_grad()
def greedy(model: nn.Module, n: int = 6, ids: torch.Tensor | None = None, **kw) -> torch.Tensor:
    ids = token_ids(7, seed=3) if ids is None else ids
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


class HeadZeroHooks:
    """Reference for pruning: zero the pruned heads' slices of each o_proj input."""

    def __init__(self, s: ModelStructure, heads: dict[int, list[int]]):
        self.handles = []
        for layer, hs in heads.items():
            def pre(mod, args, hs=tuple(hs)):
                x = args[0].clone()                                   # [B, T, H * D]
                for h in hs:
                    x[..., h * s.head_dim:(h + 1) * s.head_dim] = 0
                return (x,)
            self.handles.append(s.blocks[layer].attn.o_proj.register_forward_pre_hook(pre))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
