"""The executor's modules on the kernels: layouts built at apply, memory, rollback bitwise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from headroom_sidecar.agent.adapters.base import WeightLayout
from headroom_sidecar.agent.executor import ExecutorSettings, weight_bytes
from headroom_sidecar.agent.executor.int8 import Int8Embedding, Int8Kernel, Int8Linear, apply_head_int8
from headroom_sidecar.agent.executor.sparsity import SparseDownProj
from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.agent.kernels import Backend, Int8Cpu, KernelSettings
from headroom_sidecar.agent.kernels.reference import int8_linear_ref
from tests.agent.executor import assert_bitwise_equal, greedy, logits, plan, rig, state_snapshot
from tests.builders import tiny_llama

FBGEMM = KernelSettings(int8_cpu=Int8Cpu.FBGEMM)


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_fbgemm_int8_linear_holds_only_the_packed_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q8 = Int8Linear.from_module(lin, WeightLayout.OUT_IN, FBGEMM)
    assert q8.kernel == Int8Kernel.FBGEMM and "weight_int8" not in dict(q8.named_buffers())
    assert q8.opaque_bytes() == 96 * 40 + 40 * 20
    assert weight_bytes(q8) == q8.opaque_bytes() + 40 * 4 * 2   # + scale, bias
    x = torch.randn(2, 3, 96)
    ref = int8_linear_ref(x.reshape(-1, 96), q8.int8_weight(), q8.scale, q8.bias).reshape(2, 3, 40)
    assert ((q8(x) - ref).norm() / ref.norm()) < 0.03


INT8PACK_BF16 = KernelSettings(int8_cpu=Int8Cpu.INT8PACK_BF16)


def test_int8pack_bf16_kernel_is_close_and_holds_plain_int8():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    q8 = Int8Linear.from_module(lin, WeightLayout.OUT_IN, INT8PACK_BF16)
    assert q8.kernel == Int8Kernel.INT8PACK_BF16 and q8.opaque_bytes() == 0
    assert weight_bytes(q8) == 256 * 96 + 96 * (4 + 2 + 4)     # int8 + fp32/bf16 scales + bias
    x = torch.randn(3, 256)
    ref = int8_linear_ref(x, q8.weight_int8, q8.scale, q8.bias)
    out = q8(x)
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()) < 0.005


def test_default_cpu_int8_kernel_is_measured():
    """auto: the safe candidates are timed; the fastest correct one is kept (int8pack_bf16
    is not assumed: on some CPUs it is slower than dequant, or unsafe for a shape class)."""
    q8 = Int8Linear.from_module(nn.Linear(64, 33), WeightLayout.OUT_IN, KernelSettings())
    c = q8.choice
    assert set(c.candidates_us) | set(c.rejected) == {"int8pack_bf16", "dequant"}
    assert q8.kernel.value == min(c.candidates_us, key=c.candidates_us.get)
    assert q8.opaque_bytes() == 0


def test_dequant_int8_kernel_is_exact_to_reference():
    lin = nn.Linear(64, 33)
    q8 = Int8Linear.from_module(lin, WeightLayout.OUT_IN, KernelSettings(int8_cpu=Int8Cpu.DEQUANT))
    assert q8.kernel == Int8Kernel.DEQUANT and q8.opaque_bytes() == 0
    x = torch.randn(5, 64)
    torch.testing.assert_close(q8(x), int8_linear_ref(x, q8.weight_int8, q8.scale, q8.bias),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [Backend.CPU_FAST, Backend.REFERENCE])
@pytest.mark.parametrize("int8", [False, True])
def test_sparse_decode_layout_equals_dense(backend, int8):
    torch.manual_seed(0)
    settings = KernelSettings(backend=backend, int8_cpu=Int8Cpu.INT8PACK_BF16)
    lin = nn.Linear(136, 70)
    inner = Int8Linear.from_module(lin, WeightLayout.OUT_IN, settings) if int8 else lin
    fast = SparseDownProj(inner, 0.6, weight_in_out=False, decode_gather=True, settings=settings)
    dense = SparseDownProj(inner, 0.6, weight_in_out=False, decode_gather=False)
    assert fast.backend == backend and dense.decode_w is None
    if backend == Backend.CPU_FAST:
        assert fast.decode_w.dtype == (torch.uint8 if int8 else torch.float32)
    w = inner.dequantized() if int8 else lin.weight                # what the weights mean
    a = torch.randn(1, 1, 136)                                    # decode: the sparse path
    torch.testing.assert_close(fast(a), F.linear(fast.sparsify(a), w, lin.bias if not int8
                                                 else inner.bias), atol=1e-5, rtol=1e-5)
    a = torch.randn(1, 5, 136)                                    # prefill: dense, inner's kernel
    assert torch.equal(fast(a), dense(a))


def test_layout_follows_an_int8_swap_of_inner_and_its_rollback():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    sp = SparseDownProj(lin, 0.5, weight_in_out=False, decode_gather=True,
                        settings=KernelSettings(backend=Backend.CPU_FAST))
    fp_bytes = weight_bytes(sp)
    log = UndoLog()
    log.swap(sp, "inner", Int8Linear.from_module(lin, WeightLayout.OUT_IN))   # what the executor does
    assert sp.decode_w.dtype == torch.uint8
    a = torch.randn(1, 1, 64)
    torch.testing.assert_close(sp(a), F.linear(sp.sparsify(a), sp.inner.dequantized(), sp.inner.bias),
                               atol=1e-5, rtol=1e-5)
    log.undo()
    assert sp.inner is lin and sp.decode_w.dtype == torch.float32 and weight_bytes(sp) == fp_bytes


@pytest.mark.parametrize("kernel", [Int8Kernel.FBGEMM, Int8Kernel.INT8PACK_BF16])
def test_executor_plan_on_fast_paths_rolls_back_bitwise(monkeypatch, kernel):
    monkeypatch.setenv("HEADROOM_INT8_CPU_KERNEL", kernel.value)
    r = rig(tiny_llama(), settings=ExecutorSettings(sparse_decode_gather=True))
    snap, base, gen = state_snapshot(r.model), logits(r.model), greedy(r.model)
    r.executor.apply(plan(r.fingerprint,
                          {"kind": "activation_sparsity", "thresholds": {"0": 0.02, "2": 0.02}},
                          {"kind": "weight_precision", "layers": {"0": "int8", "1": "int8", "2": "int8"}}))
    down = r.structure.layers[0].mlp.down_proj
    assert down.inner.kernel == kernel and down.decode_w.dtype == torch.uint8
    out = logits(r.model)
    assert 0 < ((out - base).norm() / base.norm()) < 0.15     # W8A8 + sparsity, tiny random model
    greedy(r.model)                                               # decode runs the sparse path
    r.executor.rollback()
    assert torch.equal(logits(r.model), base) and torch.equal(greedy(r.model), gen)
    assert_bitwise_equal(r.model, snap)


@pytest.mark.parametrize("tied", [True, False])
def test_head_int8_close_smaller_and_bitwise_rollback(tied):
    model = _tied_llama() if tied else tiny_llama()
    snap, base = state_snapshot(model), logits(model)
    before = weight_bytes(model)
    log = UndoLog()
    notes = apply_head_int8(model, log)
    assert isinstance(model.lm_head, Int8Linear) and ("tied" in notes[0]) == tied
    assert isinstance(model.get_input_embeddings(), Int8Embedding) == tied
    if tied:     # one int8 matrix serves both: 4 bytes -> 1 byte per weight, still shared
        assert model.lm_head.weight_int8.data_ptr() == model.model.embed_tokens.weight_int8.data_ptr()
    head_fp_bytes = 128 * 64 * 4
    assert before - weight_bytes(model) >= 0.74 * head_fp_bytes - 128 * 4
    out = logits(model)
    assert ((out - base).norm() / base.norm()) < 0.02
    log.undo()
    assert torch.equal(logits(model), base)
    assert_bitwise_equal(model, snap)


def test_int8_embedding_rows_are_dequantised_rows():
    q = torch.randint(-127, 128, (10, 6), dtype=torch.int8)
    scale = torch.rand(10)
    ids = torch.tensor([[3, 0, 9], [9, 9, 1]])
    out = Int8Embedding(q, scale)(ids)
    torch.testing.assert_close(out, (q.float() * scale[:, None])[ids])


@pytest.mark.parametrize("int8", [False, True])
def test_modules_compile_whole_graph_through_the_custom_ops(int8):
    """Under torch.compile the modules call torch.ops.headroom.* (traced by their fakes)."""
    settings = KernelSettings(backend=Backend.CPU_FAST)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    inner = Int8Linear.from_module(lin, WeightLayout.OUT_IN, settings) if int8 else lin
    sp = SparseDownProj(inner, 0.5, weight_in_out=False, decode_gather=True, settings=settings)
    seen = []
    compiled = torch.compile(sp, backend=lambda gm, ex: seen.append(gm) or gm, fullgraph=True)
    a = torch.randn(1, 1, 64)
    torch.testing.assert_close(compiled(a), sp(a))
    targets = {str(n.target) for n in seen[0].graph.nodes if n.op == "call_function"}
    assert any("headroom" in t for t in targets), targets
