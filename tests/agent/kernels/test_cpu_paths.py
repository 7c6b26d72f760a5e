"""CPU fast paths and the custom ops vs the PyTorch reference; kernel selection. Always run."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.kernels import Backend, KernelSettings, KernelUnavailableError, select_backend
from headroom_sidecar.agent.kernels import cpu
from headroom_sidecar.agent.kernels.reference import int8_linear_ref, sparse_gemv_ref

SHAPES = [(96, 64), (77, 45), (1536, 576)]     # (I, O), odd sizes and SmolLM2's down_proj


def _sparse_act(m: int, i: int, sparsity: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, i, generator=g)
    return a.masked_fill(torch.rand(m, i, generator=g) < sparsity, 0)


def _int8(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
            torch.rand(n, generator=g) * 0.02 + 1e-3)


@pytest.mark.parametrize("i,o", SHAPES)
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_embedding_bag_sparse_gemv(i, o, m, sparsity):
    a, w_t, b = _sparse_act(m, i, sparsity), torch.randn(i, o), torch.randn(o)
    out = torch.ops.headroom.sparse_gemv(a, w_t, None, b)
    torch.testing.assert_close(out, sparse_gemv_ref(a, w_t, None, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("i,o", SHAPES)
@pytest.mark.parametrize("m", [1, 4])
def test_rowwise_u8_sparse_gemv_int8(i, o, m):
    a = _sparse_act(m, i, 0.7)
    q_t, scale = _int8(i, o)[0], _int8(o, 1, seed=2)[1]
    rows = cpu.rowwise_u8_layout(q_t)
    assert rows.dtype == torch.uint8 and rows.shape == (i, o + 8)
    out = torch.ops.headroom.sparse_gemv_u8rows(a, rows, scale, None)
    torch.testing.assert_close(out, sparse_gemv_ref(a, q_t, scale), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (4, 45, 77), (1, 4100, 33)])
def test_int8_linear_op_matches_reference(m, n, k, dtype):
    q, scale = _int8(n, k)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    out = torch.ops.headroom.int8_linear(x, q, scale.to(dtype), b)
    torch.testing.assert_close(out, int8_linear_ref(x, q, scale.to(dtype), b), **tol)


@pytest.mark.skipif(not cpu.fbgemm_available(), reason="this torch build has no fbgemm engine")
@pytest.mark.parametrize("n,k", [(45, 77), (576, 1536)])
def test_fbgemm_w8a8_close_to_weight_only(n, k):
    q, scale = _int8(n, k)
    x, b = torch.randn(4, k), torch.randn(n)
    packed = cpu.fbgemm_pack(q, scale, b)
    ref = int8_linear_ref(x, q, scale, b)
    rel = ((cpu.fbgemm_linear(x, packed) - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel        # 7-bit per-tensor activations: ~1.3% on Gaussian inputs
    assert torch.equal(torch.ops.quantized.linear_unpack(packed)[0].int_repr(), q)


@pytest.mark.parametrize("op,args", [
    ("int8_linear", lambda: (torch.randn(3, 20), _int8(7, 20)[0], _int8(7, 20)[1], None)),
    ("sparse_gemv", lambda: (_sparse_act(1, 20, 0.5), torch.randn(20, 7), None, torch.randn(7))),
    ("sparse_gemv_u8rows", lambda: (_sparse_act(1, 20, 0.5), cpu.rowwise_u8_layout(_int8(20, 7)[0]),
                                    torch.rand(7), None)),
])
def test_custom_ops_pass_opcheck_and_compile(op, args):
    """Fake impls agree with the real ones, and a compiled graph keeps the op whole."""
    a = args()
    packet = getattr(torch.ops.headroom, op)
    torch.library.opcheck(packet.default, a)
    compiled = torch.compile(lambda *t: packet(*t) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*a), packet(*a) * 2)


def test_selection_auto_on_cpu_is_the_fast_path():
    assert select_backend(torch.device("cpu"), KernelSettings()) == Backend.CPU_FAST
    assert select_backend(torch.device("meta"), KernelSettings()) == Backend.REFERENCE


def test_forcing_triton_on_cpu_is_refused_clearly():
    with pytest.raises(KernelUnavailableError, match="needs CUDA"):
        select_backend(torch.device("cpu"), KernelSettings(backend=Backend.TRITON))


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("HEADROOM_INT8_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match="HEADROOM_INT8_CPU_KERNEL='fast'"):
        KernelSettings.resolve()
    monkeypatch.setenv("HEADROOM_INT8_CPU_KERNEL", "fbgemm")
    assert KernelSettings.resolve().int8_cpu.value == "fbgemm"
    with pytest.raises(TypeError, match="unknown kernel setting"):
        KernelSettings.resolve(colour="red")


def test_impl_is_the_function_behind_the_op_for_that_device():
    from headroom_sidecar.agent.kernels import ops
    assert ops.impl("int8_linear", torch.device("cpu")) is ops.dequant_linear
    assert ops.impl("int8_linear", torch.device("cuda")) is ops._int8_linear_cuda
    with pytest.raises(ValueError, match="no kernel for cuda"):
        ops.impl("sparse_gemv_u8rows", torch.device("cuda"))


def test_probe_settings_are_validated_and_named(monkeypatch, tmp_path):
    assert KernelSettings().int8_cpu.value == "auto"
    with pytest.raises(ValueError, match="probe_timeout_s=0"):
        KernelSettings(probe_timeout_s=0)                 # the boundary: must be > 0
    assert KernelSettings(probe_timeout_s=1e-3).probe_timeout_s == 1e-3
    monkeypatch.setenv("HEADROOM_KERNEL_PROBE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="HEADROOM_KERNEL_PROBE_TIMEOUT_S='soon'"):
        KernelSettings.resolve()
    monkeypatch.setenv("HEADROOM_KERNEL_PROBE_TIMEOUT_S", "30")
    monkeypatch.setenv("HEADROOM_KERNEL_CACHE_DIR", str(tmp_path))
    s = KernelSettings.resolve()
    assert s.probe_timeout_s == 30.0 and s.cache_path() == tmp_path
    assert str(KernelSettings(cache_dir="").cache_path()).endswith(".cache/headroom/kernels")
    assert "~" not in str(KernelSettings(cache_dir="").cache_path())
