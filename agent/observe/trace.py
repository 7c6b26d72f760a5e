"""Full trace of one sampled request: per-layer hooks that exist only while the request runs.

All statistics accumulate in one device tensor `[L, columns]`; the host receives it with a
single `.cpu()` at the request's end. Statistics are taken on "stat steps": the request's first
forward (prefill: up to MAX_PREFILL_QUERIES query positions for attention) and every
`attn_decode_stride`-th later forward (attention: last query only). Their hooks are registered
for a stat step's forward only; other forwards of a traced request carry just the timing hooks
(attention and MLP time cover every forward).

What the statistics see (tests/agent/observe/test_eager_parity.py checks each against the
model's own eager computation, alone and left-padded in a batch):
- attention: the probabilities the attention module returns (eager attention: they include
  the padding mask, sliding window, soft-capping, q/k norms). Without them (sdpa) they are
  re-derived from the adapter's qk_probe (q/k after the model's norms and RoPE), the module's
  `scaling` and `attn_logit_softcapping`, and the 4D `attention_mask` the model passed to it;
  other attention implementations are refused (the request goes untraced, counted in errors).
- padding: the 2D `attention_mask` [B, S] the model's body receives (structure.padding_source);
  pad query positions drop out of every average (entropy, max weight, head output norm,
  influence, MLP activations). With padding the counts behind the averages are device tensors,
  kept in extra accumulator columns so they still reach the host in the one transfer.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import BlockRefs, ModelStructure, UnsupportedModelError
from headroom_sidecar.agent.observe import stats
from headroom_sidecar.agent.observe.timing import Part, make_timer
from headroom_sidecar.agent.records import MAGNITUDE_QUANTILES, SPARSITY_THRESHOLDS, TraceArrays

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
        # Counts behind the averages when a padding mask makes them data-dependent (device side);
        # without padding they are known from shapes and kept on the host.
        self.queries, self.tokens, self.elements = range(self.quantiles.stop, self.quantiles.stop + 3)
        self.width = self.quantiles.stop + 3

# Attention implementations whose probabilities can be re-derived from q, k and the 4D mask the
# model passes (None: not a transformers module, plain causal attention).
_DERIVABLE_IMPLEMENTATIONS = (None, "eager", "sdpa")


def _first_tensor(args: tuple, kwargs: dict, name: str) -> Optional[torch.Tensor]:
    return kwargs.get(name, args[0] if args else None)


def _main_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _returned_probs(output, heads: int) -> Optional[torch.Tensor]:
    """The attention probabilities [B, H, Tq, S] an (eager) attention module returned, or None."""
    if not isinstance(output, (tuple, list)) or len(output) < 2:
        return None
    p = output[1]
    if not isinstance(p, torch.Tensor) or p.dim() != 4 or p.shape[1] != heads:
        return None
    return p


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
        self._scored = 0                                   # attention hooks that ran
        self._stashed: dict[tuple[str, int], torch.Tensor] = {}
        self._query_idx: dict[tuple[int, torch.device], torch.Tensor] = {}  # this forward's
        self._padding: Optional[torch.Tensor] = None       # this forward's 2D attention_mask
        self._valid: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # this forward's
        self._forward_index = -1
        self._handles = [h for block in structure.blocks for h in self._register_timing(block)]
        # Stat hooks are built once per request and registered for each stat step's forward.
        self._stat_registrations = self._padding_hook() + [
            r for block in structure.blocks for r in self._stat_hooks(block)]
        self._stat_handles: list = []

    # --- request side -------------------------------------------------------------------------

    def begin_forward(self, forward_index: int) -> None:
        self._forward_index = forward_index
        self._clear_forward()
        if not self.failed and (forward_index == 0 or forward_index % self._stride == 0):
            self._stat_handles = [register() for register in self._stat_registrations]

    def end_forward(self) -> None:
        for h in self._stat_handles:
            h.remove()
        self._stat_handles = []
        self._clear_forward()

    def _clear_forward(self) -> None:
        self._stashed.clear()
        self._query_idx.clear()
        self._valid.clear()
        self._padding = None

    def finish(self) -> Optional[TraceArrays]:
        """Removes the hooks; returns None if a hook failed or nothing was observed."""
        self.remove_hooks()
        if self.failed or self._scored == 0:
            return None
        acc = self._acc.cpu().numpy().astype(np.float64)   # the request's one device -> host transfer
        times = self._timer.totals_ms()
        c = self._cols
        queries = (self._queries + acc[:, c.queries])[:, None]         # [L, 1]
        tokens = self._tokens + acc[:, c.tokens]                       # [L]
        elements = (self._elements + acc[:, c.elements])[:, None]      # [L, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = acc[:, c.out_norm]
            return TraceArrays(
                head_entropy=(acc[:, c.entropy] / queries).astype(np.float32),
                head_max_weight=(acc[:, c.max_weight] / queries).astype(np.float32),
                head_out_share=(out / out.sum(1, keepdims=True)).astype(np.float32),
                layer_influence=(acc[:, c.influence] / tokens).astype(np.float32),
                layer_attn_ms=times[Part.ATTN], layer_mlp_ms=times[Part.MLP],
                mlp_frac_below=(acc[:, c.below] / elements).astype(np.float32),
                mlp_quantiles=(acc[:, c.quantiles] / elements).astype(np.float32))

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
        return [
            p(block.module.register_forward_pre_hook,
              g(lambda m, a, k: self._stash("block", i, a, k)), with_kwargs=True),
            p(block.module.register_forward_hook, g(lambda m, a, o: self._block_out(i, o))),
            p(block.attn.module.register_forward_hook,
              g(lambda m, a, k, o: self._attn_out(block, a, k, o)), with_kwargs=True),
            p(block.attn.o_proj.register_forward_pre_hook, g(lambda m, a: self._stash_arg("o", i, a))),
            p(block.mlp.module.register_forward_hook, g(lambda m, a, o: self._mlp_out(i))),
            p(block.mlp.down_proj.register_forward_pre_hook,
              g(lambda m, a: self._stash_arg("down", i, a))),
        ]

    def _padding_hook(self) -> list[Callable[[], object]]:
        """The body's forward pre-hook that keeps this forward's 2D padding mask (a reference)."""
        source = self._s.padding_source
        if source is None:
            return []
        keep = self._guard(lambda m, a, k: setattr(self, "_padding", k.get("attention_mask")))
        return [functools.partial(source.register_forward_pre_hook, keep, with_kwargs=True)]

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

    def _count(self, layer: int, column: int, host: np.ndarray, n) -> None:
        """Adds a count: host int (known from shapes) or device tensor (padding-dependent)."""
        if isinstance(n, torch.Tensor):
            self._acc[layer, column] += n
        else:
            host[layer] += n

    def _token_mask(self, b: int, t: int, device: torch.device) -> Optional[torch.Tensor]:
        """[B, T] True for the real tokens of this forward (the mask's last T columns); None
        when the model got no padding mask."""
        m = self._padding
        if m is None:
            return None
        valid = self._valid.get((b, t, device))
        if valid is None:
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != b or m.shape[1] < t:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(
                    f"headroom trace: attention_mask {shape} given to "
                    f"{type(self._s.padding_source).__name__} for [batch={b}, tokens={t}]: only a "
                    f"2D [batch, keys] padding mask (1 = token) can be traced")
            valid = m[:, -t:].to(device=device, dtype=torch.bool)    # [B, T]
            self._valid[(b, t, device)] = valid
        return valid

    def _block_out(self, i: int, output) -> None:
        x_in = self._stashed.pop(("block", i))
        x_out = _main_output(output)                                 # [B, T, hidden]
        valid = self._token_mask(x_out.shape[0], x_out.shape[1], x_out.device)
        total, n = stats.influence_sum(x_in, x_out, valid)
        self._acc[i, self._cols.influence] += total
        self._count(i, self._cols.tokens, self._tokens, n)

    def _attn_out(self, block: BlockRefs, args: tuple, kwargs: dict, output) -> None:
        i, c, s = block.index, self._cols, self._s
        probs = _returned_probs(output, s.num_heads)                 # [B, H, Tq, S] or None
        if probs is not None:
            idx = self._query_index(probs.shape[2], probs.device)
            rows = probs.index_select(2, idx)                        # [B, H, n, S]
            t_q = probs.shape[2]
        else:
            q, k = self._derivation_inputs(block.attn.module, args, kwargs)
            idx, t_q = self._query_index(q.shape[2], q.device), q.shape[2]
            rows = stats.attention_probs(q, k, idx, self._scale(block.attn.module),
                                         getattr(block.attn.module, "attn_logit_softcapping", None),
                                         kwargs.get("attention_mask"))
        valid = self._token_mask(rows.shape[0], t_q, rows.device)
        valid_q = None if valid is None else valid.index_select(1, idx)   # [B, n]
        entropy, max_weight, n = stats.row_stats(rows, valid_q)
        self._acc[i, c.entropy] += entropy
        self._acc[i, c.max_weight] += max_weight
        self._count(i, c.queries, self._queries, n)
        self._scored += 1
        o_in = self._stashed.pop(("o", i))                           # [B, Tq, H * D]
        self._acc[i, c.out_norm] += stats.head_output_norms(
            o_in, block.attn.o_proj.weight, s.weight_layout, s.num_heads, s.head_dim, idx, valid_q)

    def _derivation_inputs(self, attn: nn.Module, args: tuple, kwargs: dict):
        """(q [B, H, Tq, D], k [B, KVH, S, D]) to re-derive the probabilities from; refuses what
        cannot be re-derived exactly."""
        where = f"{self._s.architecture} ({type(attn).__name__})"
        if self._s.qk_probe is None:
            raise UnsupportedModelError(
                f"{where}: the attention returned no probabilities (attn_implementation is not "
                f"'eager') and the adapter has no qk_probe to re-derive them")
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        mask = kwargs.get("attention_mask")
        if impl not in _DERIVABLE_IMPLEMENTATIONS or not (mask is None or mask.dim() == 4):
            raise UnsupportedModelError(
                f"{where}: attention statistics under attn_implementation={impl!r} (mask "
                f"{None if mask is None else tuple(mask.shape)}) cannot be re-derived; use "
                f"'eager' or 'sdpa'")
        q, k = self._s.qk_probe(attn, args, kwargs)                  # [B, H, Tq, D], [B, KVH, S, D]
        if k.shape[2] < q.shape[2]:
            raise UnsupportedModelError(f"{where}: qk_probe gave {k.shape[2]} keys for "
                                        f"{q.shape[2]} queries")
        return q, k

    def _mlp_out(self, i: int) -> None:
        a = self._stashed.pop(("down", i))                           # [B, T, I]
        valid = self._token_mask(a.shape[0], a.shape[1], a.device) if a.dim() == 3 else None
        below, quantiles, n = stats.activation_stats(a, self._thresholds, MAGNITUDE_QUANTILES,
                                                     valid=valid)
        self._acc[i, self._cols.below] += below
        self._acc[i, self._cols.quantiles] += quantiles * n          # element-weighted mean
        self._count(i, self._cols.elements, self._elements, n)

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
