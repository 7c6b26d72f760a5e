"""CPU fast paths (fbgemm, via ops that ship with PyTorch), and the layouts they need.

- Sparse decode: y = sum over surviving activations k of a[k] * w_t[k, :], computed by
  embedding_bag with per-sample weights: it reads only the surviving rows of w_t, in place,
  without materialising a gathered copy.
- Sparse decode on int8 weights: the same with fbgemm's 8-bit row-wise embedding bag. Its
  row format is uint8 values followed by an fp32 scale and an fp32 bias; storing q + 128 with
  scale 1 and bias -128 makes each row exactly the int8 row q_t[k, :]; the per-output-channel
  scale factors out of the sum and is applied once to the result.
- int8 matmul: fbgemm's dynamic-quantised linear on a per-channel int8 weight packed once
  (W8A8; see settings.py for what that costs in accuracy).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

_ROW_TAIL_BYTES = 8      # fp32 scale + fp32 bias after each row of the 8-bit row-wise format


def rowwise_u8_layout(q_t: torch.Tensor) -> torch.Tensor:
    """q_t [I, O] int8 -> [I, O + 8] uint8 rows that fbgemm dequantises to exactly q_t."""
    vals = (q_t.to(torch.int16) + 128).to(torch.uint8)                       # [I, O]
    tail = torch.tensor([1.0, -128.0], dtype=torch.float32).view(torch.uint8)  # [8]
    return torch.cat([vals, tail.expand(q_t.shape[0], _ROW_TAIL_BYTES)], dim=1).contiguous()


_ONE_BAG = torch.zeros(1, dtype=torch.long)


def _bags(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a [M, I] -> (indices [nnz], offsets [M], weights [nnz]): one bag per token."""
    if a.shape[0] == 1:                     # decode: two small ops, this runs per layer per token
        flat = a.view(-1)
        idx = flat.nonzero().view(-1)
        return idx, _ONE_BAG, flat.index_select(0, idx)
    rows, cols = a.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=a.shape[0])
    offsets = torch.zeros(a.shape[0], dtype=torch.long)
    offsets[1:] = counts.cumsum(0)[:-1]
    return cols, offsets, a[rows, cols]


def sparse_gemv_cpu(a: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, I] fp32 (mostly zeros), w_t [I, O] fp32 contiguous -> [M, O]."""
    idx, offsets, weights = _bags(a)
    y = F.embedding_bag(idx, w_t, offsets, mode="sum", per_sample_weights=weights)
    return y if bias is None else y + bias


def sparse_gemv_int8_cpu(a: torch.Tensor, rows_u8: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, I] fp32, rows_u8 from rowwise_u8_layout, scale [O] -> [M, O]."""
    idx, offsets, weights = _bags(a)
    y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        rows_u8, idx, offsets, False, 0, False, weights.float()) * scale
    return y if bias is None else y + bias


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Per-channel int8 weight [N, K] packed once for fbgemm (an opaque C++ object)."""
    scale32 = scale.detach().float()
    with warnings.catch_warnings():
        # Quantized tensors are deprecated (pytorch#184982); they are only the packing input.
        warnings.simplefilter("ignore", UserWarning)
        qt = torch._make_per_channel_quantized_tensor(
            q, scale32.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
    with _engine("fbgemm"):
        return torch.ops.quantized.linear_prepack(qt, None if bias is None else bias.detach().float())


def fbgemm_packed_bytes(q: torch.Tensor) -> int:
    """What the packed copy holds: the int8 matrix, plus per-channel column offsets, scale and
    zero point (4 + 8 + 8 bytes). A lower bound: fbgemm's block padding is not counted."""
    return q.numel() + q.shape[0] * 20


def fbgemm_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x [M, K] fp32 -> [M, N] fp32; activations quantised per call (reduce_range for AVX2)."""
    return torch.ops.quantized.linear_dynamic(x, packed, True)


class _engine:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.old = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.old
