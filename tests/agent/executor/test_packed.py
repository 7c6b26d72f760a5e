"""weight_precision fp32_packed: the same fp32 model in another layout, refused where it
cannot run, chosen by timing, rolled back bitwise, and a verifier speculation keeps exact."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from headroom_sidecar.agent.executor import weight_bytes
from headroom_sidecar.agent.executor.int8 import Int8Linear
from headroom_sidecar.agent.executor.packed import (RUNNER, PackedLinear, choose_dense_kernel,
                                                   packable_reason, probe_cases)
from headroom_sidecar.agent.executor.speculative import PromptLookupDrafter, speculative_generate
from headroom_sidecar.agent.executor.sparsity import SparseDownProj
from headroom_sidecar.agent.kernels import Fp32Cpu, KernelSettings, probe
from headroom_sidecar.agent.kernels.autotune import KernelChoice
from headroom_sidecar.proto.plan import PlanError
from tests.agent.executor import assert_bitwise_equal, greedy, logits, plan, rig, state_snapshot
from tests.builders import tiny_llama, tiny_qwen2, token_ids

ALL = {"kind": "weight_precision", "layers": {"0": "fp32_packed", "1": "fp32_packed",
                                              "2": "fp32_packed", "lm_head": "fp32_packed"}}


@pytest.fixture
def forced(monkeypatch):
    """Pack every layer (the timing would keep aten on shapes this small); probe verdicts in
    the test session's folder (tests/conftest.py)."""
    monkeypatch.setenv("HEADROOM_FP32_CPU_KERNEL", "onednn_packed")
    return KernelSettings.resolve()


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """Probe verdicts in a folder of this test alone (a test writes one), memo cleared."""
    monkeypatch.setenv("HEADROOM_KERNEL_CACHE_DIR", str(tmp_path))
    probe.clear_memo()
    yield
    probe.clear_memo()


def test_packed_linear_matches_nn_linear_and_gives_its_weight_back(forced):
    lin = nn.Linear(72, 48)
    packed = PackedLinear(lin.weight.detach(), lin.bias, KernelChoice("onednn_packed"))
    xs = [torch.randn(*shape) for shape in [(1, 72), (5, 72), (2, 7, 72), (2, 3, 4, 72)]]
    xs.append(torch.randn(72, 6).t())                          # [6, 72], not contiguous
    for x in xs:
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(packed.weight, lin.weight.detach())
    assert packed.opaque_bytes() >= 72 * 48 * 4
    assert weight_bytes(packed) == packed.opaque_bytes() + 48 * 4            # + the bias


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_apply_packs_every_linear_keeps_the_logits_and_rolls_back_bitwise(forced, builder):
    r = rig(builder())
    snap, base, gen = state_snapshot(r.model), logits(r.model), greedy(r.model)
    report = r.executor.apply(plan(r.fingerprint, ALL))
    packed = [m for m in r.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 3 * 7 + 1                    # q k v o gate up down per block, lm_head
    assert {n: v["kernel"] for n, v in report.kernels.items()} == {
        n: "onednn_packed" for n, m in r.model.named_modules() if isinstance(m, PackedLinear)}
    torch.testing.assert_close(logits(r.model), base, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(r.model), gen)
    r.executor.rollback()
    assert not any(isinstance(m, PackedLinear) for m in r.model.modules())
    assert torch.equal(logits(r.model), base)
    assert_bitwise_equal(r.model, snap)


def test_a_packed_tied_head_is_a_second_copy_and_says_so(forced):
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight          # tied, as SmolLM2's are
    r = rig(model)
    before = weight_bytes(r.model)
    report = r.executor.apply(plan(r.fingerprint, {"kind": "weight_precision",
                                                   "layers": {"lm_head": "fp32_packed"}}))
    assert any("second copy of the tied embedding" in n for n in report.notes)
    assert report.weight_bytes_after == before + r.model.lm_head.opaque_bytes()


def test_a_bf16_model_is_refused_before_any_weight_is_touched(forced):
    r = rig(tiny_llama().to(torch.bfloat16))
    snap = state_snapshot(r.model)
    with pytest.raises(PlanError, match=r"transforms\[0\]\.layers: fp32_packed on 0, 1, 2, "
                                        r"lm_head needs fp32 weights; the model's are bfloat16"):
        r.executor.apply(plan(r.fingerprint, ALL))
    assert_bitwise_equal(r.model, snap)
    r.executor.apply(plan(r.fingerprint, {"kind": "weight_precision", "layers": {"0": "int8"}}))


def test_a_sparsified_down_projection_stays_unpacked(forced):
    r = rig(tiny_llama())
    r.executor.apply(plan(r.fingerprint, ALL, {"kind": "activation_sparsity",
                                               "thresholds": {"1": 0.05}}))
    down = r.model.model.layers[1].mlp.down_proj
    assert isinstance(down, SparseDownProj) and isinstance(down.inner, nn.Linear)
    assert isinstance(r.model.model.layers[0].mlp.down_proj, PackedLinear)


def test_an_int8_draft_over_a_packed_verifier_quantises_the_packed_weights(forced):
    from headroom_sidecar.agent.executor.speculative.install import build_draft
    r = rig(tiny_llama())
    r.executor.apply(plan(r.fingerprint, ALL))
    int8 = plan(r.fingerprint, {"kind": "weight_precision", "layers": {"1": "int8"}}).ordered()
    draft = build_draft(r.executor, tuple(int8))
    with draft.active():
        assert isinstance(r.model.model.layers[1].self_attn.q_proj, Int8Linear)
    assert isinstance(r.model.model.layers[1].self_attn.q_proj, PackedLinear)


@pytest.mark.parametrize("k", (1, 4))
def test_speculation_over_a_packed_verifier_returns_its_own_tokens(forced, k):
    r = rig(tiny_llama())
    ids = token_ids(10, seed=5)
    ids = torch.cat([ids, ids[:, :6]], dim=1)                       # a repeat to look up
    r.executor.apply(plan(r.fingerprint, ALL))
    ref = greedy(r.model, 20, ids)[0, ids.shape[1]:]
    out, stats = speculative_generate(r.model, ids, 20, PromptLookupDrafter(), k)
    assert torch.equal(out, ref) and stats.proposed > 0


def test_aten_is_kept_with_the_reason_where_packing_cannot_run(forced):
    assert "not an nn.Linear" in packable_reason(nn.Conv1d(4, 4, 1))
    half = nn.Linear(8, 8).bfloat16()
    choice = choose_dense_kernel(half, forced)
    assert choice.kernel == "aten" and "bfloat16" in choice.rejected["onednn_packed"]


def test_forcing_aten_leaves_the_layers_and_says_so(forced, monkeypatch):
    monkeypatch.setenv("HEADROOM_FP32_CPU_KERNEL", "aten")
    r = rig(tiny_llama())
    report = r.executor.apply(plan(r.fingerprint, ALL))
    assert not any(isinstance(m, PackedLinear) for m in r.model.modules())
    assert "fp32_packed: 21 linear(s) left as they are: HEADROOM_FP32_CPU_KERNEL=aten" in report.notes


def test_an_unsafe_probe_verdict_keeps_aten(own_cache, forced):
    lin = nn.Linear(72, 48)
    case = probe_cases(lin)[0]
    assert case.runner == RUNNER
    path = probe.cache_file(forced, probe.machine("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": probe.machine("cpu"), "verdicts": {
        case.key: {"safe": False, "reason": "killed by SIGSEGV"}}}))
    choice = choose_dense_kernel(lin, forced)
    assert choice.kernel == "aten" and choice.rejected == {"onednn_packed": "probe: killed by SIGSEGV"}


def test_auto_times_both_row_counts_and_keeps_the_smaller_sum(own_cache, monkeypatch):
    monkeypatch.delenv("HEADROOM_FP32_CPU_KERNEL", raising=False)
    settings = KernelSettings.resolve()
    assert settings.fp32_cpu == Fp32Cpu.AUTO
    choice = choose_dense_kernel(nn.Linear(576, 1536), settings)
    t = choice.candidates_us
    assert set(t) == {"onednn_packed x1", "aten x1", "onednn_packed x8", "aten x8"}
    total = {k: t[f"{k} x1"] + t[f"{k} x8"] for k in ("onednn_packed", "aten")}
    assert choice.kernel == min(total, key=total.get)
