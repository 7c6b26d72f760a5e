"""Adapters find the right parts, and their qk_probe reproduces the model's own attention."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from headroom_sidecar.agent.adapters import (GPT2Adapter, HFLlamaAdapter, PlainAdapter, UnsupportedModelError,
                            WeightLayout, registered_adapters, resolve_structure)
from tests.builders import ALL_BUILDERS, tiny_gpt2, tiny_llama, tiny_plain, token_ids

# (adapter, heads, kv heads, head_dim, hidden, intermediate, layout)
EXPECTED = {
    "llama": (HFLlamaAdapter, 4, 2, 16, 64, 128, WeightLayout.OUT_IN),
    "qwen2": (HFLlamaAdapter, 4, 2, 16, 64, 128, WeightLayout.OUT_IN),
    "mistral": (HFLlamaAdapter, 4, 1, 16, 64, 128, WeightLayout.OUT_IN),
    "gpt2": (GPT2Adapter, 4, 4, 16, 64, 256, WeightLayout.IN_OUT),
    "plain": (PlainAdapter, 4, 2, 16, 64, 128, WeightLayout.OUT_IN),
}


@pytest.mark.parametrize("arch", sorted(ALL_BUILDERS))
def test_structure_describes_the_model(arch):
    model = ALL_BUILDERS[arch]()
    s = resolve_structure(model)
    adapter, heads, kv_heads, head_dim, hidden, inter, layout = EXPECTED[arch]
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (3, heads, kv_heads, head_dim)
    assert (s.hidden_size, s.intermediate_size, s.weight_layout) == (hidden, inter, layout)
    assert [b.index for b in s.blocks] == [0, 1, 2]
    assert all(b.module is layer for b, layer in zip(s.blocks, s.layers))
    o = s.blocks[1].attn.o_proj.weight
    in_features = o.shape[1] if layout is WeightLayout.OUT_IN else o.shape[0]
    assert in_features == heads * head_dim
    down = s.blocks[1].mlp.down_proj.weight
    assert (down.shape[1] if layout is WeightLayout.OUT_IN else down.shape[0]) == inter
    assert (s.blocks[0].mlp.gate_proj is None) == (arch == "gpt2")
    first_match = next(a for a in registered_adapters() if a.matches(model))
    assert type(first_match) is adapter


def test_unknown_model_names_what_is_missing():
    with pytest.raises(UnsupportedModelError, match=r"Sequential.*registered: .*hf-gpt2"):
        resolve_structure(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("build, layer_path, missing", [
    (tiny_plain, ("layers", 1, "feed_forward"), "w1"),
    (tiny_gpt2, ("transformer", "h", 2, "mlp"), "c_fc"),
    (tiny_llama, ("model", "layers", 1, "self_attn"), "v_proj"),
])
def test_missing_part_is_named_with_its_layer(build, layer_path, missing):
    model = build()
    parent = model
    for step in layer_path:
        parent = parent[step] if isinstance(step, int) else getattr(parent, step)
    delattr(parent, missing)
    with pytest.raises(UnsupportedModelError, match=rf"\[?{layer_path[-2]}\]?.*'{missing}'"):
        resolve_structure(model)


def _probe_probs(structure, layer: int, model, ids, generate_tokens: int = 0):
    """Causal softmax(q k^T * scale) from the adapter's probe, for every forward of the call."""
    seen = []
    attn = structure.blocks[layer].attn.module

    def hook(mod, args, kwargs, out):
        q, k = structure.qk_probe(mod, args, kwargs)
        scale = getattr(mod, "scaling", 1 / math.sqrt(q.shape[-1]))
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ k.transpose(-1, -2)) * scale                          # [B, H, Tq, S]
        t_q, n_k = s.shape[-2:]
        causal = torch.ones(t_q, n_k, dtype=torch.bool).tril(n_k - t_q)
        seen.append(s.masked_fill(~causal, -math.inf).softmax(-1))
    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = (model.generate(ids, max_new_tokens=generate_tokens, do_sample=False, pad_token_id=0)
                   if generate_tokens else model(ids))
    finally:
        h.remove()
    return seen, out


def _eager_attentions(build, ids, layer: int) -> torch.Tensor:
    ref = build()
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        return ref(ids, output_attentions=True).attentions[layer]     # [B, H, T, T]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_probe_matches_eager_attention_at_prefill_and_decode(arch):
    build = ALL_BUILDERS[arch]
    model, ids = build(), token_ids(9, batch=2)
    s = resolve_structure(model)
    probs, out = _probe_probs(s, 1, model, ids, generate_tokens=4)
    assert len(probs) == out.shape[1] - ids.shape[1]                 # one per forward
    full = _eager_attentions(build, out[:, :-1], 1)                    # every position ever queried
    T = ids.shape[1]
    torch.testing.assert_close(probs[0], full[:, :, :T, :T], atol=1e-5, rtol=1e-4)
    for step, p in enumerate(probs[1:], start=1):                     # decode: keys come from the cache
        pos = T + step - 1
        assert p.shape[-2:] == (1, pos + 1)
        torch.testing.assert_close(p[:, :, 0], full[:, :, pos, :pos + 1], atol=1e-5, rtol=1e-4)


def test_plain_probe_reproduces_the_attention_output():
    model, ids = tiny_plain(), token_ids(11, batch=2)
    s = resolve_structure(model)
    attn = model.layers[2].attention
    captured = {}
    h = attn.register_forward_hook(lambda m, a, k, o: captured.update(args=a, kwargs=k, out=o),
                                   with_kwargs=True)
    with torch.no_grad():
        model(ids)
        h.remove()
        q, k = s.qk_probe(attn, captured["args"], captured["kwargs"])
        x = captured["args"][0]
        v = attn.wqkv(x)[..., -attn.n_local_heads * attn.head_dim:]
        v = v.view(*x.shape[:2], attn.n_local_heads, attn.head_dim).transpose(1, 2)
        group = attn.n_head // attn.n_local_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        y = scores.masked_fill(~causal, -math.inf).softmax(-1) @ v     # [B, H, T, D]
        out = attn.wo(y.transpose(1, 2).reshape(*x.shape[:2], -1))
    torch.testing.assert_close(out, captured["out"], atol=1e-5, rtol=1e-4)
