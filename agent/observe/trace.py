"""Full trace of one sampled request: per-layer hooks that exist only while the request runs.

All statistics accumulate in one device tensor `[L, columns]`; the host receives it with a
single `.cpu()` at the request's end. Statistics are taken on "stat steps": the request's first
forward (prefill: up to MAX_PREFILL_QUERIES query positions for attention) and every
`attn_decode_stride`-th later forward (attention: last query only). Their hooks are registered
for a stat step's forward only; other forwards of a traced request carry just the timing hooks
(attention and MLP time cover every forward).

Attention statistics ignore padding masks and sliding windows: every key up to the query's
position counts.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from agent.adapters.base import BlockRefs, ModelStructure
from agent.observe import stats
from agent.observe.timing import Part, make_timer
from agent.records import MAGNITUDE_QUANTILES, SPARSITY_THRESHOLDS, TraceArrays

MAX_PREFILL_QUERIES = 64


class _Columns:
    """Column ranges of the per-layer accumulator row."""

    def __init__(self, heads: int):
        self.entropy = slice(0, heads)
        self.max_weight = slice(heads, 2 * heads)
        self.out_norm = slice(2 * heads, 3 * heads)
        self.influence = 3 * heads
        self.below = slice(3 * heads + 1, 3 * heads + 1 + len(SPARSITY_THRESHOLDS))
        self.quantiles = slice(self.below.stop, self.below.stop + len(MAGNITUDE_QUANTILES))
        self.width = self.quantiles.stop


def _first_tensor(args: tuple, kwargs: dict, name: str) -> Optional[torch.Tensor]:
    return kwargs.get(name, args[0] if args else None)


def _main_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class TraceCollector:
    """Registers its timing hooks in __init__; `finish()` removes all and returns the TraceArrays."""

    def __init__(self, structure: ModelStructure, device: torch.device, decode_stride: int,
                 on_error: Callable[[BaseException], None]):
        self._s = structure
        self._stride = decode_stride
        self._on_error = on_error
        self.failed = False
        L, H = structure.num_layers, structure.num_heads
        self._cols = _Columns(H)
        self._acc = torch.zeros(L, self._cols.width, device=device, dtype=torch.float32)
        self._thresholds = torch.tensor(SPARSITY_THRESHOLDS, device=device, dtype=torch.float32)
        # Denominators are known on the host (shapes only): no device round trip.
        self._queries = np.zeros(L, dtype=np.int64)
        self._tokens = np.zeros(L, dtype=np.int64)
        self._elements = np.zeros(L, dtype=np.int64)
        self._timer = make_timer(L, device)
        self._stashed: dict[tuple[str, int], torch.Tensor] = {}
        self._query_idx: dict[tuple[int, torch.device], torch.Tensor] = {}  # this forward's
        self._forward_index = -1
        self._handles = [h for block in structure.blocks for h in self._register_timing(block)]
        # Stat hooks are built once per request and registered for each stat step's forward.
        self._stat_registrations = [r for block in structure.blocks for r in self._stat_hooks(block)]
        self._stat_handles: list = []

    # --- request side -------------------------------------------------------------------------

    def begin_forward(self, forward_index: int) -> None:
        self._forward_index = forward_index
        self._stashed.clear()
        self._query_idx.clear()
        if not self.failed and (forward_index == 0 or forward_index % self._stride == 0):
            self._stat_handles = [register() for register in self._stat_registrations]

    def end_forward(self) -> None:
        for h in self._stat_handles:
            h.remove()
        self._stat_handles = []
        self._stashed.clear()
        self._query_idx.clear()

    def finish(self) -> Optional[TraceArrays]:
        """Removes the hooks; returns None if a hook failed or nothing was observed."""
        self.remove_hooks()
        if self.failed or not self._queries.any():
            return None
        acc = self._acc.cpu().numpy()           # the request's one device -> host transfer
        times = self._timer.totals_ms()
        c = self._cols
        with np.errstate(invalid="ignore", divide="ignore"):
            q = self._queries[:, None].astype(np.float32)
            out = acc[:, c.out_norm]
            return TraceArrays(
                head_entropy=(acc[:, c.entropy] / q).astype(np.float32),
                head_max_weight=(acc[:, c.max_weight] / q).astype(np.float32),
                head_out_share=(out / out.sum(1, keepdims=True)).astype(np.float32),
                layer_influence=(acc[:, c.influence] / self._tokens).astype(np.float32),
                layer_attn_ms=times[Part.ATTN], layer_mlp_ms=times[Part.MLP],
                mlp_frac_below=(acc[:, c.below] / self._elements[:, None]).astype(np.float32),
                mlp_quantiles=(acc[:, c.quantiles] / self._elements[:, None]).astype(np.float32))

    def remove_hooks(self) -> None:
        self.end_forward()
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- hooks --------------------------------------------------------------------------------

    def _register_timing(self, block: BlockRefs) -> list:
        i, g = block.index, lambda fn: self._guard(fn, stats=False)
        attn, mlp = block.attn.module, block.mlp.module
        return [attn.register_forward_pre_hook(g(lambda m, a: self._timer.start(Part.ATTN, i))),
                attn.register_forward_hook(g(lambda m, a, o: self._timer.stop(Part.ATTN, i))),
                mlp.register_forward_pre_hook(g(lambda m, a: self._timer.start(Part.MLP, i))),
                mlp.register_forward_hook(g(lambda m, a, o: self._timer.stop(Part.MLP, i)))]

    def _stat_hooks(self, block: BlockRefs) -> list[Callable[[], object]]:
        """Registrations (each returns its handle) of one block's statistics hooks."""
        # Registered after the timing hooks, so they run after the timing window has closed;
        # inside a module only references are stashed (o_proj and down_proj inputs).
        i, g, p = block.index, self._guard, functools.partial
        scale = self._scale(block.attn.module)
        return [
            p(block.module.register_forward_pre_hook,
              g(lambda m, a, k: self._stash("block", i, a, k)), with_kwargs=True),
            p(block.module.register_forward_hook, g(lambda m, a, o: self._block_out(i, o))),
            p(block.attn.module.register_forward_hook,
              g(lambda m, a, k, o: self._attn_out(block, scale, a, k)), with_kwargs=True),
            p(block.attn.o_proj.register_forward_pre_hook, g(lambda m, a: self._stash_arg("o", i, a))),
            p(block.mlp.module.register_forward_hook, g(lambda m, a, o: self._mlp_out(i))),
            p(block.mlp.down_proj.register_forward_pre_hook,
              g(lambda m, a: self._stash_arg("down", i, a))),
        ]

    def _guard(self, fn, stats: bool = True):
        """Hooks never raise into the model: a failure ends tracing for this request.

        Statistics run without autograd; timing hooks skip that context, they compute nothing.
        """
        def hook(*args):
            if self.failed:
                return None
            try:
                if stats:
                    with torch.no_grad():
                        fn(*args)
                else:
                    fn(*args)
            except Exception as exc:  # noqa: BLE001 - any failure must stay out of the model
                self.failed = True
                self._stashed.clear()
                self._on_error(exc)
            return None
        return hook

    def _stash(self, kind: str, layer: int, args: tuple, kwargs: dict) -> None:
        self._stashed[(kind, layer)] = _first_tensor(args, kwargs, "hidden_states")

    def _stash_arg(self, kind: str, layer: int, args: tuple) -> None:
        self._stashed[(kind, layer)] = args[0]

    def _block_out(self, i: int, output) -> None:
        x_in = self._stashed.pop(("block", i))
        x_out = _main_output(output)
        self._acc[i, self._cols.influence] += stats.influence_sum(x_in, x_out)
        self._tokens[i] += x_out.numel() // x_out.shape[-1]

    def _attn_out(self, block: BlockRefs, scale: float, args: tuple, kwargs: dict) -> None:
        i, c, s = block.index, self._cols, self._s
        q, k = s.qk_probe(block.attn.module, args, kwargs)           # [B, H, Tq, D], [B, KVH, S, D]
        idx = self._query_index(q.shape[2], q.device)
        entropy, max_weight = stats.attention_stats(q, k, idx, scale)
        self._acc[i, c.entropy] += entropy
        self._acc[i, c.max_weight] += max_weight
        self._queries[i] += q.shape[0] * idx.numel()
        o_in = self._stashed.pop(("o", i))                           # [B, Tq, H * D]
        self._acc[i, c.out_norm] += stats.head_output_norms(
            o_in, block.attn.o_proj.weight, s.weight_layout, s.num_heads, s.head_dim, idx)

    def _mlp_out(self, i: int) -> None:
        a = self._stashed.pop(("down", i))                           # [B, T, I]
        below, quantiles, n = stats.activation_stats(a, self._thresholds, MAGNITUDE_QUANTILES)
        self._acc[i, self._cols.below] += below
        self._acc[i, self._cols.quantiles] += quantiles * n          # element-weighted mean
        self._elements[i] += n

    def _query_index(self, t_q: int, device: torch.device) -> torch.Tensor:
        """Built once per forward (and device): every layer scores the same query positions."""
        idx = self._query_idx.get((t_q, device))
        if idx is None:
            if self._forward_index == 0:
                idx = stats.query_subsample(t_q, MAX_PREFILL_QUERIES, device)
            else:
                idx = torch.arange(t_q - 1, t_q, device=device)     # last query only
            self._query_idx[(t_q, device)] = idx
        return idx

    def _scale(self, attn: nn.Module) -> float:
        # HF attention modules carry their softmax scale (GPT-2 may scale by layer index too).
        scale = getattr(attn, "scaling", None)
        return float(scale) if isinstance(scale, (int, float)) else 1.0 / math.sqrt(self._s.head_dim)
