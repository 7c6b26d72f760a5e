"""Traced statistics against independent computations on the same tiny models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headroom_sidecar.agent.adapters import WeightLayout, resolve_structure
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.observe import MAX_PREFILL_QUERIES, stats
from headroom_sidecar.agent.records import MAGNITUDE_QUANTILES, SPARSITY_THRESHOLDS
from headroom_sidecar.agent.settings import AgentSettings
from tests.builders import ALL_BUILDERS, greedy_plain, token_ids

TRACE_ALL = AgentSettings(sample_rate=1.0, attn_decode_stride=2)


def _traced(arch: str, run, settings: AgentSettings = TRACE_ALL):
    """(record of the one request `run(model)` makes, its return value)."""
    model, records = ALL_BUILDERS[arch](), []
    handle = AgentHandle(model, resolve_structure(model), settings, records.append)
    with torch.no_grad():
        out = run(model)
    handle.detach()
    assert handle.errors == 0 and len(records) == 1
    return records[0], out


def _entropy_and_max(p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """p [B, H, n, S] rows of attention -> mean over (B, n) of entropy and max weight, [H]."""
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return ent.mean((0, 2)).numpy(), p.amax(-1).mean((0, 2)).numpy()


def _eager_attentions(arch: str, ids: torch.Tensor) -> list[torch.Tensor]:
    ref = ALL_BUILDERS[arch]()
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        return list(ref(ids, output_attentions=True).attentions)      # L x [B, H, T, T]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_attention_stats_match_eager_attention(arch):
    ids = token_ids(12, batch=2)
    rec, _ = _traced(arch, lambda m: m(ids))
    for layer, p in enumerate(_eager_attentions(arch, ids)):
        ent, mx = _entropy_and_max(p)
        np.testing.assert_allclose(rec.trace.head_entropy[layer], ent, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec.trace.head_max_weight[layer], mx, rtol=1e-4, atol=1e-5)


def test_long_prefill_scores_a_subsample_of_queries():
    T = 90
    ids = token_ids(T, batch=1)
    rec, _ = _traced("llama", lambda m: m(ids))
    rows = stats.query_subsample(T, MAX_PREFILL_QUERIES, torch.device("cpu"))
    assert rows.numel() == MAX_PREFILL_QUERIES and rows[0] == 0 and rows[-1] == T - 1
    p = _eager_attentions("llama", ids)[0]
    ent, mx = _entropy_and_max(p[:, :, rows])
    np.testing.assert_allclose(rec.trace.head_entropy[0], ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rec.trace.head_max_weight[0], mx, rtol=1e-4, atol=1e-5)
    ent_all, _ = _entropy_and_max(p)
    assert not np.allclose(ent, ent_all, rtol=1e-4)                   # the subsample mattered


@pytest.mark.parametrize("arch, stride", [("llama", 2), ("gpt2", 3), ("mistral", 1)])
def test_decode_steps_score_the_last_query_every_stride(arch, stride):
    ids = token_ids(7, batch=1)
    settings = AgentSettings(sample_rate=1.0, attn_decode_stride=stride)
    rec, out = _traced(arch, lambda m: m.generate(ids, max_new_tokens=6, do_sample=False,
                                                   pad_token_id=0), settings)
    T, forwards = ids.shape[1], out.shape[1] - ids.shape[1]
    assert rec.output_tokens == forwards
    rows = list(range(T)) + [T + f - 1 for f in range(1, forwards) if f % stride == 0]
    for layer, p in enumerate(_eager_attentions(arch, out[:, :-1])):
        ent, mx = _entropy_and_max(p[:, :, rows])
        np.testing.assert_allclose(rec.trace.head_entropy[layer], ent, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec.trace.head_max_weight[layer], mx, rtol=1e-4, atol=1e-5)


def _plain_attentions(ids: torch.Tensor) -> list[torch.Tensor]:
    """Causal attention probabilities of tiny_plain, by hand from each attention's input."""
    from tests.builders import apply_rotary_emb
    ref, inputs = ALL_BUILDERS["plain"](), []
    for layer in ref.layers:
        layer.attention.register_forward_hook(lambda m, a, o: inputs.append((m, *a)))
    with torch.no_grad():
        ref(ids)
    probs = []
    for attn, x, freqs_cis in inputs:
        B, T, _ = x.shape
        H, KVH, D = attn.n_head, attn.n_local_heads, attn.head_dim
        qkv = attn.wqkv(x).detach()
        q = apply_rotary_emb(qkv[..., :H * D].view(B, T, H, D), freqs_cis).transpose(1, 2)
        k = apply_rotary_emb(qkv[..., H * D:(H + KVH) * D].view(B, T, KVH, D), freqs_cis)
        k = k.transpose(1, 2).repeat_interleave(H // KVH, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        probs.append(scores.masked_fill(~causal, -math.inf).softmax(-1))
    return probs


def test_full_forward_decoding_scores_the_last_query_of_each_stat_step():
    ids, stride, new_tokens = token_ids(6, batch=2), 2, 5
    settings = AgentSettings(sample_rate=1.0, attn_decode_stride=stride)
    model, records = ALL_BUILDERS["plain"](), []
    handle = AgentHandle(model, resolve_structure(model), settings, records.append)
    with handle.request(route="/plain"), torch.no_grad():
        out = greedy_plain(model, ids, new_tokens)                    # full forwards, no cache
    (rec,) = records
    assert handle.errors == 0 and rec.route == "/plain"
    assert rec.output_tokens == new_tokens * ids.shape[0]             # decode steps x sequences
    T = ids.shape[1]
    rows = list(range(T)) + [T + f - 1 for f in range(1, new_tokens) if f % stride == 0]
    for layer, p in enumerate(_plain_attentions(out[:, :-1])):
        ent, mx = _entropy_and_max(p[:, :, rows])
        np.testing.assert_allclose(rec.trace.head_entropy[layer], ent, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec.trace.head_max_weight[layer], mx, rtol=1e-4, atol=1e-5)


def _capture_inputs(model, modules: dict) -> dict:
    got = {}
    for name, mod in modules.items():
        mod.register_forward_pre_hook(lambda m, a, name=name: got.__setitem__(name, a[0].detach()))
    return got


@pytest.mark.parametrize("arch", ["llama", "gpt2", "plain"])
def test_head_output_share_matches_per_head_projection(arch):
    ids = token_ids(10, batch=2)
    rec, _ = _traced(arch, lambda m: m(ids))
    ref = ALL_BUILDERS[arch]()
    s = resolve_structure(ref)
    got = _capture_inputs(ref, {b.index: b.attn.o_proj for b in s.blocks})
    with torch.no_grad():
        ref(ids)
    D = s.head_dim
    for b in s.blocks:
        w, x = b.attn.o_proj.weight.detach(), got[b.index]          # x [B, T, H * D]
        if s.weight_layout is WeightLayout.OUT_IN:
            w = w.T                                                   # now [H * D, hidden]
        norms = []
        for h in range(s.num_heads):
            w_h = w[h * D:(h + 1) * D]                                # head h's input rows
            norms.append(torch.linalg.vector_norm(x[..., h * D:(h + 1) * D] @ w_h, dim=-1).sum())
        share = torch.stack(norms) / torch.stack(norms).sum()
        np.testing.assert_allclose(rec.trace.head_out_share[b.index], share.numpy(), rtol=1e-4)
        assert rec.trace.head_out_share[b.index].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_influence_matches_hidden_states(arch):
    ids = token_ids(10, batch=2)
    rec, _ = _traced(arch, lambda m: m(ids))
    with torch.no_grad():
        hs = ALL_BUILDERS[arch]()(ids, output_hidden_states=True).hidden_states
    # hidden_states[i] enters layer i; the last entry is after the final norm, so it is skipped.
    for layer in range(len(hs) - 2):
        cos = torch.nn.functional.cosine_similarity(hs[layer], hs[layer + 1], dim=-1)
        assert rec.trace.layer_influence[layer] == pytest.approx(float((1 - cos).mean()), rel=1e-4)
    assert 0 < rec.trace.layer_influence[-1] < 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "plain"])
def test_mlp_sparsity_matches_down_proj_input(arch):
    ids = token_ids(10, batch=2)
    rec, _ = _traced(arch, lambda m: m(ids))
    ref = ALL_BUILDERS[arch]()
    s = resolve_structure(ref)
    got = _capture_inputs(ref, {b.index: b.mlp.down_proj for b in s.blocks})
    with torch.no_grad():
        ref(ids)
    for b in s.blocks:
        a = got[b.index].abs().reshape(-1).numpy()
        frac = [(a < t).mean() for t in SPARSITY_THRESHOLDS]
        np.testing.assert_allclose(rec.trace.mlp_frac_below[b.index], frac, atol=1e-6)
        np.testing.assert_allclose(rec.trace.mlp_quantiles[b.index],
                                   np.quantile(a, MAGNITUDE_QUANTILES), rtol=1e-4)


def test_timing_covers_every_layer_and_fits_in_the_request():
    ids = token_ids(10, batch=1)
    rec, _ = _traced("plain", lambda m: m(ids))
    t = rec.trace
    assert (t.layer_attn_ms > 0).all() and (t.layer_mlp_ms > 0).all()
    assert t.layer_attn_ms.sum() + t.layer_mlp_ms.sum() <= rec.latency_ms


def test_activation_stats_subsample_big_inputs():
    a = torch.linspace(-1, 1, 300_001)
    counts, q, n = stats.activation_stats(a, torch.tensor([0.5]), (0.5,), max_elements=1000)
    assert n == len(range(0, 300_001, 301)) and n <= 1000
    assert counts.item() / n == pytest.approx(0.5, abs=0.01)
    assert q.item() == pytest.approx(0.5, abs=0.01)


def test_attention_stats_of_uniform_keys_are_log_of_visible_keys():
    q = torch.zeros(1, 2, 4, 8)                                        # zero scores: uniform rows
    k = torch.randn(1, 1, 6, 8)
    ent, mx = stats.attention_stats(q, k, torch.arange(4), scale=1.0)
    visible = torch.arange(3, 7).float()                                # queries at positions 2..5
    assert torch.allclose(ent, visible.log().sum().expand(2))
    assert torch.allclose(mx, (1 / visible).sum().expand(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the CPU path is tested above")
def test_cuda_trace_matches_the_cpu_trace_and_times_with_events():
    ids = token_ids(10, batch=2)
    cpu_rec, _ = _traced("llama", lambda m: m(ids))
    model, records = ALL_BUILDERS["llama"]().cuda(), []
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        bare = model.generate(ids.cuda(), **gen)
    handle = AgentHandle(model, resolve_structure(model), TRACE_ALL, records.append)
    with torch.no_grad():
        model(ids.cuda())
        out = model.generate(ids.cuda(), **gen)
    handle.detach()
    assert torch.equal(out, bare) and handle.errors == 0 and len(records) == 2
    for name in ("head_entropy", "head_max_weight", "head_out_share", "layer_influence",
                 "mlp_frac_below", "mlp_quantiles"):
        np.testing.assert_allclose(getattr(records[0].trace, name), getattr(cpu_rec.trace, name),
                                   rtol=1e-3, atol=5e-3, err_msg=name)
    for rec in records:
        assert (rec.trace.layer_attn_ms > 0).all() and (rec.trace.layer_mlp_ms > 0).all()
