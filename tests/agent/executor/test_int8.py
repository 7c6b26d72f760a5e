"""weight_precision int8: close to fp, and the weights really take ~1 byte each."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from headroom_sidecar.agent.adapters.base import WeightLayout
from headroom_sidecar.agent.executor import weight_bytes
from headroom_sidecar.agent.executor.int8 import Int8Linear, quantize_per_channel
from headroom_sidecar.agent.kernels import probe
from tests.agent.executor import logits, plan, rig
from tests.builders import tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache_dir(tmp_path_factory):
    """Probe verdicts of this module go to a folder of its own, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADROOM_KERNEL_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_relative_error(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True).to(dtype)
    q8 = Int8Linear.from_module(lin, WeightLayout.OUT_IN)
    x = torch.randn(3, 7, 256, dtype=dtype)
    ref, out = lin(x).float(), q8(x).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    # symmetric per-channel int8: |w - q*s| <= s/2, so ~0.5 / 127 * sqrt(1/3) relative, plus bf16
    assert rel < (0.01 if dtype == torch.float32 else 0.03), rel
    assert q8.weight_int8.dtype == torch.int8 and not hasattr(q8, "weight")


def test_quantize_roundtrip_bound():
    w = torch.randn(64, 32)
    q, s = quantize_per_channel(w)
    assert (w - q.float() * s[:, None]).abs().le(s[:, None] / 2 + 1e-7).all()


def test_conv1d_layout():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(48, 32)                       # weight [in=32, out=48]
    q8 = Int8Linear.from_module(conv, WeightLayout.IN_OUT)
    x = torch.randn(2, 5, 32)
    ref = conv(x)
    assert ((q8(x) - ref).norm() / ref.norm()) < 0.01


def test_model_int8_close_and_four_times_smaller():
    r = rig(tiny_llama())
    base = logits(r.model)
    blocks_before = sum(weight_bytes(b) for b in r.structure.layers)
    norms = sum(weight_bytes(b.input_layernorm) + weight_bytes(b.post_attention_layernorm)
                for b in r.structure.layers)
    r.executor.apply(plan(r.fingerprint, {"kind": "weight_precision",
                                          "layers": {"0": "int8", "1": "int8", "2": "int8"}}))
    blocks_after = sum(weight_bytes(b) for b in r.structure.layers)
    linear_before, linear_after = blocks_before - norms, blocks_after - norms
    assert 3.5 < linear_before / linear_after <= 4.0
    out = logits(r.model)
    assert ((out - base).norm() / base.norm()) < 0.02


def test_weight_bytes_counts_tied_storage_once():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tied = LlamaForCausalLM(cfg)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    both_bytes = sum(p.numel() * p.element_size()
                     for _, p in tied.named_parameters(remove_duplicate=False))
    buffer_bytes = sum(b.numel() * b.element_size() for b in tied.buffers())
    assert weight_bytes(tied) == both_bytes - 128 * 64 * 4 + buffer_bytes


def test_apply_reports_each_layers_measured_kernel(monkeypatch, tmp_path):
    """One probe child for every shape class of the plan; each Int8Linear's choice in the
    report, JSON-ready (agent/control.py sends dataclasses.asdict(report))."""
    monkeypatch.setenv("HEADROOM_KERNEL_CACHE_DIR", str(tmp_path))
    launches, real_launch = [], probe._launch
    monkeypatch.setattr(probe, "_launch", lambda cases, timeout_s: launches.append(cases)
                        or real_launch(cases, timeout_s))       # a counter around the real one
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)           # intermediate 136: three shape classes (k % 64 = 8 among them)
    r = rig(LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=136, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2)).eval())
    report = r.executor.apply(plan(r.fingerprint, {"kind": "weight_precision",
                                                   "layers": {"0": "int8", "2": "int8"}}))
    first = {c.key for c in launches[0]}      # later children only rerun what a crash cut off
    assert len(first) == 3 and all({c.key for c in l} < first for l in launches[1:])
    int8_paths = {n for n, m in r.model.named_modules() if isinstance(m, Int8Linear)}
    assert len(int8_paths) == 14 and set(report.kernels) == int8_paths
    for choice in report.kernels.values():
        timed = choice["candidates_us"]
        assert choice["kernel"] == (min(timed, key=timed.get) if timed else "dequant")
    assert json.loads(json.dumps(dataclasses.asdict(report)))["kernels"] == report.kernels
    r.executor.rollback()
    again = r.executor.apply(plan(r.fingerprint, {"kind": "skip_layers", "layers": [1]}))
    assert again.kernels == {}
