"""Every traced statistic against the model's own eager computation, per architecture.

Reference: the same model, detached, run once more with output_attentions=True (eager
probabilities: padding, sliding windows, soft-capping, q/k norms included), hidden states /
block outputs for influence, and down_proj's input (the MLP activation) captured by a hook.
Each case runs alone (batch 1, no mask) and left-padded in a batch of 2 with an attention_mask;
pad positions must drop out of every average. Tolerance 1e-3 absolute.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headroom_sidecar.agent.adapters import UnsupportedModelError, WeightLayout, resolve_structure
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.records import MAGNITUDE_QUANTILES, SPARSITY_THRESHOLDS
from headroom_sidecar.agent.settings import AgentSettings
from tests.builders import ARCH_BUILDERS, token_ids

TRACE_ALL = AgentSettings(sample_rate=1.0, attn_decode_stride=2)
ATOL = 1e-3
ARCHS = ["llama", "mistral_sliding", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "gpt2", "phi3"]
# Architectures whose transformers implementation offers sdpa (no probabilities come back).
SDPA_ARCHS = ["llama", "mistral_sliding", "qwen2", "qwen3", "gemma3", "olmo2", "gpt2", "phi3"]
LONG, SHORT = 9, 5          # longer than every builder's sliding window (4)


def _batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, attention_mask): one sequence alone, or two left-padded to the same length."""
    if not padded:
        return token_ids(LONG, batch=1), None
    ids = token_ids(LONG, batch=2)
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, :LONG - SHORT] = 0
    ids[1, :LONG - SHORT] = 0                                          # pad id
    return ids, mask


def _traced(model, ids, mask):
    records = []
    handle = AgentHandle(model, resolve_structure(model), TRACE_ALL, records.append)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.detach()
    assert handle.errors == 0 and len(records) == 1 and records[0].traced
    return records[0].trace


def _reference(model, ids, mask, position_ids=None):
    """The model's own eager computation: attentions, block in/out, down_proj and o_proj inputs."""
    model.set_attn_implementation("eager")
    s, got, hooks = resolve_structure(model), {}, []
    for b in s.blocks:
        i = b.index
        hooks += [b.mlp.down_proj.register_forward_pre_hook(
                      lambda m, a, i=i: got.__setitem__(("a", i), a[0])),
                  b.attn.o_proj.register_forward_pre_hook(
                      lambda m, a, i=i: got.__setitem__(("o", i), a[0])),
                  b.module.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(
                      ("out", i), o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids, output_attentions=True,
                    output_hidden_states=True)
    for h in hooks:
        h.remove()
    return s, out, got


def _expected(model, ids, mask, real=None, position_ids=None, forwards=None):
    """Per layer: (entropy [H], max weight [H], out share [H], influence, frac below, quantiles)
    over the positions `real` [B, T] (default: the real tokens). Quantiles are per traced
    forward (`forwards`: one [B, T] position mask each), averaged weighted by element count."""
    s, out, got = _reference(model, ids, mask, position_ids)
    if real is None:
        real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()  # [B, T]
    rows = []
    for b in s.blocks:
        i, p = b.index, out.attentions[b.index]                     # p [B, H, T, T]
        p_real = p.permute(0, 2, 1, 3)[real]                          # [N, H, T] real queries
        ent = -(p_real * torch.where(p_real > 0, p_real.log(), torch.zeros_like(p_real))).sum(-1)
        x_out = got[("out", i)]
        x_in = out.hidden_states[i]                                   # enters layer i
        if i + 1 < s.num_layers:                                      # the next entry is its output
            torch.testing.assert_close(out.hidden_states[i + 1], x_out)
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)[real]
        a = got[("a", i)][real].abs().reshape(-1).numpy()              # real tokens' activations
        rows.append((ent.mean(0).numpy(), p_real.amax(-1).mean(0).numpy(),
                     _head_share(s, b, got[("o", i)], real), float((1 - cos).mean()),
                     np.array([(a < t).mean() for t in SPARSITY_THRESHOLDS]),
                     _quantiles(got[("a", i)], [real] if forwards is None else forwards)))
    return rows


def _quantiles(act: torch.Tensor, forwards: list[torch.Tensor]) -> np.ndarray:
    """Element-weighted mean over forwards of each forward's |activation| quantiles."""
    parts = [act[f].abs().reshape(-1).numpy() for f in forwards]
    q = [np.quantile(p, MAGNITUDE_QUANTILES) * p.size for p in parts]
    return np.sum(q, axis=0) / sum(p.size for p in parts)


def _head_share(s, block, o_in, real) -> np.ndarray:
    """Each head's share of the summed norms of its o_proj contributions over real tokens."""
    w, D = block.attn.o_proj.weight.detach(), s.head_dim
    if s.weight_layout is WeightLayout.OUT_IN:
        w = w.T                                                       # [H * D, hidden]
    x = o_in[real]                                                    # [N, H * D]
    norms = torch.stack([(x[:, h * D:(h + 1) * D] @ w[h * D:(h + 1) * D]).norm(dim=-1).sum()
                         for h in range(s.num_heads)])
    return (norms / norms.sum()).numpy()


def _assert_parity(trace, expected):
    names = ("entropy", "max_weight", "out_share", "influence", "frac_below", "quantiles")
    for layer, exp in enumerate(expected):
        got = (trace.head_entropy[layer], trace.head_max_weight[layer],
               trace.head_out_share[layer], trace.layer_influence[layer],
               trace.mlp_frac_below[layer], trace.mlp_quantiles[layer])
        for name, g, e in zip(names, got, exp):
            np.testing.assert_allclose(g, e, atol=ATOL, rtol=0, err_msg=f"layer {layer} {name}")


@pytest.mark.parametrize("padded", [False, True], ids=["alone", "left_padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_eager_trace_matches_the_models_own_computation(arch, padded):
    model = ARCH_BUILDERS[arch]()
    ids, mask = _batch(padded)
    trace = _traced(model, ids, mask)
    _assert_parity(trace, _expected(model, ids, mask))


@pytest.mark.parametrize("arch", SDPA_ARCHS)
def test_sdpa_trace_rederives_the_eager_probabilities(arch):
    model = ARCH_BUILDERS[arch]()
    model.set_attn_implementation("sdpa")
    ids, mask = _batch(padded=True)
    trace = _traced(model, ids, mask)
    _assert_parity(trace, _expected(model, ids, mask))                # reference switches to eager


def _stat_forwards(prompt: int, forwards: int, stride: int) -> list[list[int]]:
    """Positions each stat forward of a traced generate() scores: the whole prompt, then the
    one token of every stride-th decode step."""
    return [list(range(prompt))] + [[prompt + f - 1] for f in range(1, forwards) if f % stride == 0]


@pytest.mark.parametrize("arch, impl", [("llama", "eager"), ("mistral_sliding", "eager"),
                                        ("gemma2", "eager"), ("gpt2", "eager"), ("qwen3", "sdpa")])
def test_left_padded_generate_matches_a_full_eager_forward(arch, impl):
    """Prefill plus decode steps (cached keys; windows longer than the prompt's tail) against
    one eager forward over the generated sequence, at the positions the stat steps scored."""
    model = ARCH_BUILDERS[arch]()
    model.set_attn_implementation(impl)
    ids, mask = _batch(padded=True)
    records = []
    handle = AgentHandle(model, resolve_structure(model), TRACE_ALL, records.append)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    handle.detach()
    assert handle.errors == 0 and len(records) == 1
    seq = out[:, :-1]                                                 # every position ever fed
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - LONG, dtype=torch.long)], dim=1)
    forwards = []                                                     # [B, T] per stat forward
    for group in _stat_forwards(LONG, out.shape[1] - LONG, TRACE_ALL.attn_decode_stride):
        f = torch.zeros(seq.shape, dtype=torch.bool)
        f[:, group] = True
        forwards.append(f & full_mask.bool())
    # generate() numbers positions from the mask (GPT-2's learned positions depend on it).
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    scored = torch.stack(forwards).any(0)
    _assert_parity(records[0].trace, _expected(model, seq, full_mask, scored, positions, forwards))


def _tiny_granite(impl: str):
    """A Llama-layout model whose attention class headroom's probe does not know."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, attention_multiplier=0.3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = impl
    return transformers.GraniteForCausalLM(cfg).eval()


def test_unknown_attention_is_refused_without_eager_and_exact_with_it():
    with pytest.raises(UnsupportedModelError, match=r"GraniteForCausalLM.*GraniteAttention.*'sdpa'"):
        resolve_structure(_tiny_granite("sdpa"))
    model = _tiny_granite("eager")
    assert resolve_structure(model).qk_probe is None                  # eager probabilities only
    ids, mask = _batch(padded=True)
    _assert_parity(_traced(model, ids, mask), _expected(model, ids, mask))


def test_losing_eager_after_attach_leaves_requests_untraced_and_counted():
    model, records = _tiny_granite("eager"), []
    handle = AgentHandle(model, resolve_structure(model), TRACE_ALL, records.append)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(*_batch(padded=True))
    handle.detach()
    assert handle.errors == 1 and len(records) == 1 and not records[0].traced
    assert "returned no probabilities" in str(handle._errors.last)


def test_a_4d_custom_mask_is_refused_not_misread():
    model, records = ARCH_BUILDERS["llama"](), []
    handle = AgentHandle(model, resolve_structure(model), TRACE_ALL, records.append)
    ids, mask = _batch(padded=True)
    mask_4d = mask.bool()[:, None, None, :] & torch.ones(LONG, LONG, dtype=torch.bool).tril()
    with torch.no_grad():
        model(ids, attention_mask=mask_4d)
    handle.detach()
    assert handle.errors == 1 and len(records) == 1 and not records[0].traced
    assert "only a 2D [batch, keys] padding mask" in str(handle._errors.last)


def test_mixture_of_experts_is_refused_by_name():
    with pytest.raises(UnsupportedModelError,
                       match=r"MixtralForCausalLM.*MixtralSparseMoeBlock.*mixture of experts"):
        resolve_structure(ARCH_BUILDERS["mixtral"]())


def test_phi3_roles_for_the_executor():
    s = resolve_structure(ARCH_BUILDERS["phi3"]())
    b = s.blocks[0]
    assert b.attn.qkv_proj is b.module.self_attn.qkv_proj and b.attn.q_proj is None
    assert b.mlp.up_proj is b.module.mlp.gate_up_proj and b.mlp.gate_proj is None
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 16)
