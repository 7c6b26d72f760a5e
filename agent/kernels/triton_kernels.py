"""Triton kernels for decode (a few tokens): weight-only int8 GEMV and activation-sparse GEMV.

Imported only when the Triton backend is selected (or by the tests, under TRITON_INTERPRET=1,
which runs them on CPU tensors). Both accumulate in fp32 and store the activation dtype.

- int8_gemv: y[M, N] = x[M, K] @ (q[N, K] * scale[N]).T (+ bias). Each program owns BLOCK_N
  output channels for BLOCK_M tokens and streams its int8 rows once: 1 byte per weight read,
  dequantised in registers, the scale applied once at the end.
- sparse_gemv: y[M, O] = a[M, I] @ w_t[I, O] (* scale[O]) (+ bias). w_t is the down
  projection transposed once at apply, so one activation's weights are one contiguous row.
  A row is loaded only if some token's activation for it is non-zero (a masked load issues no
  memory transaction), so the bytes read scale with the surviving activations, with no
  host-side index list (no sync, CUDA-graph friendly).
Both cut the reduction dimension into slices when there are too few output blocks to fill
the SMs (fp32 partial sums, added afterwards); with enough output blocks they store directly.

NOT RUN ON A GPU IN THIS SESSION: tested for correctness under the interpreter only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16          # above this, callers use the dense path (prefill)


@triton.jit
def _int8_gemv_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                      stride_xm, stride_qn, stride_ym, stride_ys,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    k_end = tl.minimum(K, (pid_k + 1) * K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * K_PER_SPLIT, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)   # [BM, BK]
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)     # [BN, BK]
        acc += tl.sum(x[:, None, :] * q[None, :, :], axis=2)                        # [BM, BN]
    acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        first = (pid_k == 0).to(tl.float32)             # the bias goes into one split only
        acc += first * tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT:                                           # fp32 partial sums, added by the caller
        tl.store(ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sparse_gemv_kernel(a_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, I, O, I_PER_SPLIT,
                        stride_am, stride_wi, stride_ym, stride_ys,
                        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_o, pid_i = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)                       # every token of the small batch
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_ok, o_ok = offs_m < M, offs_o < O
    i_end = tl.minimum(I, (pid_i + 1) * I_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for i0 in range(pid_i * I_PER_SPLIT, i_end, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_i[None, :],
                    mask=m_ok[:, None] & (offs_i[None, :] < i_end), other=0.0).to(tl.float32)  # [BM, BI]
        live = tl.max(tl.abs(a), axis=0) > 0                                                   # [BI]
        w = tl.load(w_ptr + offs_i[:, None] * stride_wi + offs_o[None, :],
                    mask=live[:, None] & o_ok[None, :], other=0).to(tl.float32)                # [BI, BO]
        acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)                                   # [BM, BO]
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        first = (pid_i == 0).to(tl.float32)
        acc += first * tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + pid_i * stride_ys + offs_m[:, None] * stride_ym + offs_o[None, :]
    if SPLIT:
        tl.store(ptrs, acc, mask=m_ok[:, None] & o_ok[None, :])
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


def _block_m(m: int) -> int:
    return max(1, triton.next_power_of_2(min(m, 4)))


def _splits(programs: int, length: int, block: int, device: torch.device) -> int:
    """How many slices the reduction dimension is cut into so that about 4 programs run per
    SM (a GEMV with few output blocks would otherwise leave most SMs idle). On CPU (the
    interpreter) 2, so the tests cover the split path."""
    if device.type != "cuda":
        return 2 if length >= 2 * block else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * sms, programs), length // (4 * block)))


def _launch_out(m: int, n: int, split: int, like: torch.Tensor) -> torch.Tensor:
    if split == 1:
        return torch.empty(1, m, n, dtype=like.dtype, device=like.device)
    return torch.empty(split, m, n, dtype=torch.float32, device=like.device)


def _finish(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y[0] if y.shape[0] == 1 else y.sum(0).to(dtype)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
    """x [M, K], q [N, K] int8 (contiguous), scale [N] -> [M, N] in x's dtype."""
    x = x.contiguous()
    (m, k), n = x.shape, q.shape[0]
    bm, bn, bk = _block_m(m), 32, 128
    grid_nm = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = split or _splits(grid_nm, k, bk, x.device)
    k_per = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per)
    y = _launch_out(m, n, split, x)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
    _int8_gemv_kernel[grid](x, q, scale, bias if bias is not None else scale, y, m, n, k, k_per,
                            x.stride(0), q.stride(0), y.stride(1), y.stride(0),
                            HAS_BIAS=bias is not None, SPLIT=split > 1,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return _finish(y, x.dtype)


def sparse_gemv(a: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
    """a [M, I] (M <= MAX_TOKENS), w_t [I, O] contiguous fp or int8 -> [M, O] in a's dtype."""
    a = a.contiguous()
    (m, i), o = a.shape, w_t.shape[1]
    if m > MAX_TOKENS:
        raise ValueError(f"sparse_gemv: {m} tokens > {MAX_TOKENS}; use the dense path")
    bm, bi = max(1, triton.next_power_of_2(m)), 32
    bo = 64 if bm <= 4 else 16          # keeps the [BM, BI, BO] product tile in registers
    split = split or _splits(triton.cdiv(o, bo), i, bi, a.device)
    i_per = triton.cdiv(triton.cdiv(i, split), bi) * bi
    split = triton.cdiv(i, i_per)
    y = _launch_out(m, o, split, a)
    dummy = w_t
    _sparse_gemv_kernel[(triton.cdiv(o, bo), split)](
        a, w_t, scale if scale is not None else dummy, bias if bias is not None else dummy, y,
        m, i, o, i_per, a.stride(0), w_t.stride(0), y.stride(1), y.stride(0),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
        BLOCK_M=bm, BLOCK_I=bi, BLOCK_O=bo)
    return _finish(y, a.dtype)
