"""Every transform the executor accepts, on every architecture of the test matrix, equals an
exact reference computed on the UNmodified model; a transform it cannot do exactly is refused
before a weight is touched.

References (all on the original modules, through hooks or a copy with replaced weights):
- prune_heads: a forward pre-hook on o_proj zeroing the pruned heads' input slices;
- skip_layers: a forward hook on the block returning the block's input (identity residual);
- activation_sparsity: a forward pre-hook on the down projection zeroing |a| < threshold;
- weight_precision int8 (incl. lm_head and a tied, scaled embedding): a copy of the model
  whose quantised weights are replaced by their dequantised values q * scale, in fp32, with
  the `dequant` CPU kernel (fp32 activations, no bf16 rounding);
- execution (static KV cache): the same greedy tokens as the default cache;
- prune + skip + sparsity in one plan: all their hooks at once.
An architecture no adapter accepts is skipped here with the adapter's reason (its own test
checks the refusal names the model).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from headroom_sidecar.agent.adapters import UnsupportedModelError, WeightLayout, resolve_structure
from headroom_sidecar.agent.executor.int8 import Int8Embedding, Int8Linear
from headroom_sidecar.agent.executor.prune import PrunedAttention
from headroom_sidecar.proto.plan import PlanError, TransformKind
from tests.agent.executor import (HeadZeroHooks, assert_bitwise_equal, greedy, logits, plan,
                                  rig, state_snapshot)
from tests.agent.executor.test_skip import IdentityHooks
from tests.builders import ARCH_BUILDERS, token_ids

ARCHS = sorted(ARCH_BUILDERS)
REFUSED = ("mixtral",)                # no adapter accepts it: mixture-of-experts MLP
ACCEPTED = [a for a in ARCHS if a not in REFUSED]
PRUNED = {0: [1], 2: [0, 3]}          # 4 query heads on 2 KV heads: one KV group emptied in 2
SKIPPED = [1]
IDS = token_ids(12)                   # longer than the builders' sliding window (4 tokens)
GEN = 6                               # greedy tokens after a 7-token prompt: past the window
ATOL, RTOL = 1e-5, 1e-4


def _rig(arch: str):
    return _rig_of(arch, ARCH_BUILDERS[arch]())


def _rig_of(arch: str, model: nn.Module):
    return rig(model)


def _refused(r, kind: TransformKind, *transforms: dict) -> None:
    """The executor names the reason and leaves every weight as it was."""
    reason = r.executor.supported()[kind]
    assert reason, f"{kind.value} is supported: this case should not be a refusal"
    snap = state_snapshot(r.model)
    with pytest.raises(PlanError, match=kind.value):
        r.executor.apply(plan(r.fingerprint, *transforms))
    assert_bitwise_equal(r.model, snap)
    assert r.executor.active_plan is None


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_accepts_or_refuses(arch):
    """An architecture either resolves to a structure, or is refused by name, untouched; the
    refused ones are exactly REFUSED (every other test here runs on the ACCEPTED ones)."""
    model = ARCH_BUILDERS[arch]()
    snap = state_snapshot(model)
    try:
        s = resolve_structure(model)
    except UnsupportedModelError as e:
        assert arch in REFUSED and type(model).__name__ in str(e)
        assert_bitwise_equal(model, snap)
        return
    assert arch not in REFUSED and s.num_layers == 3 and s.num_heads == 4


# ----------------------------------------------------------------------------- prune_heads

def _prune_doc(heads=PRUNED) -> dict:
    return {"kind": "prune_heads", "heads": {str(k): v for k, v in heads.items()}}


def _assert_prune_exact(r) -> None:
    """Pruning PRUNED gives the logits of the model with those heads' o_proj inputs zeroed."""
    with HeadZeroHooks(r.structure, PRUNED):
        ref = logits(r.model, IDS)
    r.executor.apply(plan(r.fingerprint, _prune_doc()))
    torch.testing.assert_close(logits(r.model, IDS), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ACCEPTED)
def test_prune_heads_exact_or_refused(arch):
    r = _rig(arch)
    if r.executor.supported()[TransformKind.PRUNE_HEADS]:
        _refused(r, TransformKind.PRUNE_HEADS, _prune_doc())
        return
    base = logits(r.model, IDS)
    with HeadZeroHooks(r.structure, PRUNED):
        ref_logits, ref_tokens = logits(r.model, IDS), greedy(r.model, n=GEN)
    r.executor.apply(plan(r.fingerprint, _prune_doc()))
    out = logits(r.model, IDS)
    assert not torch.allclose(out, base, atol=1e-4)          # pruning did something
    torch.testing.assert_close(out, ref_logits, atol=ATOL, rtol=RTOL)
    # Decode with a KV cache (sliding-window layers included) past the window length.
    assert torch.equal(greedy(r.model, n=GEN), ref_tokens)


@pytest.mark.parametrize("arch", ["mistral_sliding", "gemma2", "gemma3"])
def test_prune_generate_with_static_sliding_cache(arch):
    """Decode past the window through a static cache, layer 0 (whose cache entry gives the
    sequence length) left without any head, layer 2 without a whole KV group."""
    heads = {0: [0, 1, 2, 3], 2: [0, 1]}
    r = _rig(arch)
    with HeadZeroHooks(r.structure, heads):
        ref = greedy(r.model, n=GEN, cache_implementation="static")
    r.executor.apply(plan(r.fingerprint, _prune_doc(heads)))
    assert torch.equal(greedy(r.model, n=GEN, cache_implementation="static"), ref)


@pytest.mark.parametrize("arch", ["mistral_sliding", "qwen3", "gemma3"])
def test_prune_heads_exact_with_sdpa(arch):
    """The attention backend most models run with (the matrix builds eager ones)."""
    model = ARCH_BUILDERS[arch]()
    model.set_attn_implementation("sdpa")
    r = rig(model)
    _assert_prune_exact(r)


def test_prune_olmo2_norms_the_whole_projection_then_selects_heads():
    """OLMo2's q/k norms span all heads: q/k stay whole, v/o and the KV heads shrink."""
    r = _rig("olmo2")
    assert r.executor.supported()[TransformKind.PRUNE_HEADS] is None
    r.executor.apply(plan(r.fingerprint, _prune_doc({1: [0, 1]})))    # KV head 0 goes
    attn = r.structure.layers[1].self_attn
    assert isinstance(attn, PrunedAttention) and attn.whole_norm
    assert attn.q_proj.out_features == 4 * 16 and attn.k_proj.out_features == 2 * 16
    assert attn.q_keep.tolist() == [2, 3] and attn.k_keep.tolist() == [1]
    assert attn.v_proj.out_features == 16 and attn.o_proj.in_features == 2 * 16


@pytest.mark.parametrize("arch, norm, width, why", [
    ("qwen3", "q_norm", 32, "q_norm normalises 32 features: neither one head (16) nor the whole"),
    ("olmo2", "k_norm", 16, "one q/k norm is per head, the other over the whole projection"),
])
def test_prune_refuses_a_qk_norm_it_cannot_reproduce(arch, norm, width, why):
    model = ARCH_BUILDERS[arch]()
    attn = model.model.layers[1].self_attn
    setattr(attn, norm, type(getattr(attn, norm))(width, eps=1e-6))
    r = rig(model)
    reason = r.executor.supported()[TransformKind.PRUNE_HEADS]
    assert reason and "layer 1" in reason and why in reason
    _refused(r, TransformKind.PRUNE_HEADS, _prune_doc())


# ----------------------------------------------------------------------------- skip_layers

@pytest.mark.parametrize("arch", ACCEPTED)
def test_skip_layers_exact(arch):
    r = _rig(arch)
    assert r.executor.supported()[TransformKind.SKIP_LAYERS] is None
    base = logits(r.model, IDS)
    with IdentityHooks(r.structure, SKIPPED):       # the block returns its input
        ref_logits, ref_tokens = logits(r.model, IDS), greedy(r.model, n=GEN)
    r.executor.apply(plan(r.fingerprint, {"kind": "skip_layers", "layers": SKIPPED}))
    out = logits(r.model, IDS)
    assert not torch.allclose(out, base, atol=1e-4)          # skipping did something
    torch.testing.assert_close(out, ref_logits, atol=ATOL, rtol=RTOL)
    assert torch.equal(greedy(r.model, n=GEN), ref_tokens)


# --------------------------------------------------------------------- activation_sparsity

class SparsityHooks:
    """Reference for sparsity: the down projection's input with |a| < threshold zeroed."""

    def __init__(self, s, thresholds: dict[int, float]):
        self.handles = [s.blocks[i].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, t=t: (args[0].masked_fill(args[0].abs() < t, 0),))
            for i, t in thresholds.items()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _median_activations(r, layers: list[int]) -> dict[int, float]:
    """Per layer, a threshold that zeroes about half of its activations on IDS. torch.median
    returns one of the values, so an activation sits exactly at the threshold: the boundary
    (kept: only |a| < threshold is zeroed) is checked on every architecture."""
    seen: dict[int, torch.Tensor] = {}
    handles = [r.structure.blocks[i].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().abs().flatten()))
        for i in layers]
    try:
        logits(r.model, IDS)
    finally:
        for h in handles:
            h.remove()
    return {i: float(seen[i].median()) for i in layers}


@pytest.mark.parametrize("arch", ACCEPTED)
def test_activation_sparsity_exact_or_refused(arch):
    r = _rig(arch)
    thresholds = _median_activations(r, [0, 2])
    doc = {"kind": "activation_sparsity", "thresholds": {str(k): v for k, v in thresholds.items()}}
    if r.executor.supported()[TransformKind.ACTIVATION_SPARSITY]:
        _refused(r, TransformKind.ACTIVATION_SPARSITY, doc)
        return
    base = logits(r.model, IDS)
    with SparsityHooks(r.structure, thresholds):
        ref = logits(r.model, IDS)
    r.executor.apply(plan(r.fingerprint, doc))
    out = logits(r.model, IDS)
    assert not torch.allclose(out, base, atol=1e-6)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------ weight_precision

def _int8_doc(layers=(0, 1, 2), head: bool = True) -> dict:
    doc = {str(i): "int8" for i in layers}
    return {"kind": "weight_precision", "layers": {**doc, **({"lm_head": "int8"} if head else {})}}


def _dequantized_reference(original: nn.Module, applied: nn.Module,
                           layout: WeightLayout) -> nn.Module:
    """A copy of `original` (the unoptimised model, or one with the same structural plan
    applied) whose weights at every Int8Linear path of `applied` are q * scale (fp32).
    A tied embedding shares the head's Parameter, so it follows."""
    ref = copy.deepcopy(original)
    for name, mod in applied.named_modules():
        if not isinstance(mod, Int8Linear):
            continue
        target = ref.get_submodule(name)
        w = mod.dequantized().to(torch.float32)                       # [out, in]
        in_out = layout == WeightLayout.IN_OUT and not isinstance(target, nn.Linear)
        with torch.no_grad():
            target.weight.copy_(w.t() if in_out else w)
    return ref


@pytest.fixture
def dequant_kernel(monkeypatch):
    """fp32 activations straight through (no bf16 rounding): exact to the dequantised copy."""
    monkeypatch.setenv("HEADROOM_INT8_CPU_KERNEL", "dequant")


@pytest.mark.parametrize("arch", ACCEPTED)
def test_int8_exact_or_refused(arch, dequant_kernel):
    r = _rig(arch)
    head = r.executor.head_reason is None          # every matrix architecture's head is, today
    doc = _int8_doc(head=head)
    if r.executor.supported()[TransformKind.WEIGHT_PRECISION]:
        _refused(r, TransformKind.WEIGHT_PRECISION, doc)
        return
    original = copy.deepcopy(r.model)
    base = logits(r.model, IDS)
    r.executor.apply(plan(r.fingerprint, doc))
    assert isinstance(r.model.get_output_embeddings(), Int8Linear) == head
    ref = _dequantized_reference(original, r.model, r.structure.weight_layout)
    out = logits(r.model, IDS)
    assert not torch.allclose(out, base, atol=1e-6)             # int8 changed something
    torch.testing.assert_close(out, logits(ref, IDS), atol=ATOL, rtol=RTOL)


class ExpertBank(nn.Module):
    """A projection int8 cannot replace: per-expert weights [E, out, in] (fused MoE style)."""

    def __init__(self, inner: nn.Linear, experts: int = 2):
        super().__init__()
        self.weight = nn.Parameter(inner.weight.detach().expand(experts, -1, -1).clone())

    def forward(self, x):
        return x @ self.weight.mean(0).t()


def test_int8_refused_for_a_projection_that_is_not_a_2d_linear(dequant_kernel):
    model = ARCH_BUILDERS["llama"]()
    model.model.layers[1].mlp.down_proj = ExpertBank(model.model.layers[1].mlp.down_proj)
    r = rig(model)
    reason = r.executor.supported()[TransformKind.WEIGHT_PRECISION]
    assert reason and "layer 1: down projection is ExpertBank" in reason
    _refused(r, TransformKind.WEIGHT_PRECISION, _int8_doc(layers=(0,), head=False))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_int8_tied_scaled_embedding_keeps_its_scale(arch, dequant_kernel):
    """Gemma's tied embedding multiplies by sqrt(hidden); the int8 one must too."""
    r = _rig(arch)
    emb = r.model.get_input_embeddings()
    scale = float(emb.embed_scale)
    assert scale == pytest.approx(64 ** 0.5)
    r.executor.apply(plan(r.fingerprint, _int8_doc(layers=(), head=True)))
    new = r.model.get_input_embeddings()
    assert isinstance(new, Int8Embedding) and float(new.embed_scale) == scale
    ids = token_ids(5)
    rows = new.weight_int8[ids].float() * new.scale[ids].unsqueeze(-1)        # [1, 5, H]
    torch.testing.assert_close(new(ids), rows * scale, atol=0, rtol=0)


def test_prune_keeps_attention_logit_softcap():
    """Gemma2 caps attention logits (softcap * tanh(x / softcap)); a cap small enough to bite
    on the tiny model's logits shows the pruned attention applies it too."""
    from tests.builders import _COMMON, _hf
    build = dict(num_hidden_layers=3, sliding_window=4, final_logit_softcapping=30.0,
                 query_pre_attn_scalar=16, **_COMMON)
    uncapped = logits(_hf("Gemma2Config", "Gemma2ForCausalLM", 0, attn_logit_softcapping=None,
                          **build), IDS)
    r = rig(_hf("Gemma2Config", "Gemma2ForCausalLM", 0, attn_logit_softcapping=0.05, **build))
    assert not torch.allclose(logits(r.model, IDS), uncapped, atol=1e-3)   # the cap bites
    _assert_prune_exact(r)


def test_prune_refuses_an_attention_feature_it_does_not_reproduce():
    """A new attribute on one layer's attention (say a temperature) is refused by name."""
    r = _rig("llama")
    r.structure.blocks[2].attn.module.attn_temperature = 0.7
    reason = r.executor.supported()[TransformKind.PRUNE_HEADS]
    assert reason and "layer 2" in reason and "attn_temperature" in reason
    _refused(r, TransformKind.PRUNE_HEADS, _prune_doc())


# ----------------------------------------------------------- int8 of a tied input embedding

class OffsetEmbedding(nn.Embedding):
    """An embedding whose forward does more than a lookup (and more than a scale)."""

    def __init__(self, *args, embed_scale: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if embed_scale is not None:
            self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * 2.0 + 1.0


def _tied_llama(emb: nn.Embedding):
    """tiny_llama with `emb` as its input embedding, tied to lm_head."""
    model = ARCH_BUILDERS["llama"]()
    with torch.no_grad():
        emb.weight.copy_(model.lm_head.weight)
    model.model.embed_tokens = emb
    model.lm_head.weight = emb.weight
    return model


@pytest.mark.parametrize("emb, why", [
    (OffsetEmbedding(128, 64), "overrides nn.Embedding.forward without a scalar embed_scale"),
    (OffsetEmbedding(128, 64, embed_scale=2.0), "is not the lookup times embed_scale"),
    (nn.Embedding(128, 64, max_norm=1.0), "max_norm=1.0"),
])
def test_int8_head_refused_for_a_tied_embedding_it_cannot_reproduce(emb, why):
    r = rig(_tied_llama(emb))
    assert "tied to the input embedding" in r.executor.head_reason and why in r.executor.head_reason
    snap = state_snapshot(r.model)
    with pytest.raises(PlanError, match="lm_head"):
        r.executor.apply(plan(r.fingerprint, _int8_doc(layers=(), head=True)))
    assert_bitwise_equal(r.model, snap)
    assert r.model.get_input_embeddings() is emb


def test_int8_tied_plain_embedding_with_padding_idx(dequant_kernel):
    """A plain tied nn.Embedding (SmolLM2/Llama) still becomes int8; its padding row (zeros)
    stays exactly zero and padding_idx is kept."""
    emb = nn.Embedding(128, 64, padding_idx=0)
    model = _tied_llama(emb)
    with torch.no_grad():
        emb.weight[0].zero_()                           # the padding row, as nn.Embedding has it
    r = rig(model)
    assert r.executor.head_reason is None
    r.executor.apply(plan(r.fingerprint, _int8_doc(layers=(), head=True)))
    new = r.model.get_input_embeddings()
    assert isinstance(new, Int8Embedding) and new.padding_idx == 0 and new.embed_scale is None
    ids = torch.tensor([[0, 5, 0, 7]])
    out = new(ids)                                                         # [1, 4, 64]
    assert torch.equal(out[0, 0], torch.zeros(64)) and torch.equal(out[0, 2], torch.zeros(64))
    torch.testing.assert_close(out, nn.functional.embedding(ids, emb.weight), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------- execution

@pytest.mark.parametrize("arch", ACCEPTED)
def test_static_kv_cache_decodes_the_same_tokens(arch):
    r = _rig(arch)
    assert r.executor.supported()[TransformKind.EXECUTION] is None
    ref = greedy(r.model, n=GEN)
    r.executor.apply(plan(r.fingerprint, {"kind": "execution", "static_kv_cache": True,
                                          "compile": "none"}))
    assert r.model.generation_config.cache_implementation == "static"
    assert torch.equal(greedy(r.model, n=GEN), ref)


# ------------------------------------------------------------------- transforms together

@pytest.mark.parametrize("arch", ACCEPTED)
def test_prune_skip_sparsity_together_exact(arch):
    """Each on its own layer, all applied at once: every reference hook at once."""
    r = _rig(arch)
    heads, threshold = {0: [1, 2]}, _median_activations(r, [2])[2]
    docs = [{"kind": "skip_layers", "layers": [1]},
            {"kind": "activation_sparsity", "thresholds": {"2": threshold}}]
    if r.executor.supported()[TransformKind.PRUNE_HEADS] is None:
        docs.append(_prune_doc(heads))
    else:
        heads = {}
    with HeadZeroHooks(r.structure, heads), IdentityHooks(r.structure, [1]), \
            SparsityHooks(r.structure, {2: threshold}):
        ref = logits(r.model, IDS)
    r.executor.apply(plan(r.fingerprint, *docs))
    torch.testing.assert_close(logits(r.model, IDS), ref, atol=ATOL, rtol=RTOL)


def test_prune_gemma3_ignores_a_softcap_its_attention_does_not_apply():
    """Gemma3's attention carries attn_logit_softcapping but never applies it; neither may
    the pruned one (the Gemma2 case above applies it)."""
    from tests.builders import _COMMON, _hf
    r = rig(_hf("Gemma3TextConfig", "Gemma3ForCausalLM", 0, num_hidden_layers=3,
                sliding_window=4, query_pre_attn_scalar=16, attn_logit_softcapping=0.05,
                **_COMMON))
    _assert_prune_exact(r)
    assert r.structure.layers[0].self_attn.softcap is None


@pytest.mark.parametrize("arch", ACCEPTED)
def test_all_four_transforms_exact(arch, dequant_kernel):
    """int8 on top of skip + prune + sparsity equals the structurally transformed model (exact
    by the tests above) with the quantised weights dequantised: int8 quantises what the
    structural transforms left (a pruned layer's sliced q/k/v/o, a sparse layer's down)."""
    model = ARCH_BUILDERS[arch]()
    twin = copy.deepcopy(model)
    r = _rig_of(arch, model)
    structural = [{"kind": "skip_layers", "layers": [1]},
                  {"kind": "activation_sparsity",
                   "thresholds": {"2": _median_activations(r, [2])[2]}}]
    if r.executor.supported()[TransformKind.PRUNE_HEADS] is None:
        structural.append(_prune_doc({0: [1, 2], 2: [3]}))
    r.executor.apply(plan(r.fingerprint, *structural, _int8_doc()))
    rt = rig(twin)
    rt.executor.apply(plan(rt.fingerprint, *structural))
    ref = _dequantized_reference(rt.model, r.model, r.structure.weight_layout)
    assert any(isinstance(m, Int8Linear) for m in r.structure.layers[2].modules())
    torch.testing.assert_close(logits(r.model, IDS), logits(ref, IDS), atol=ATOL, rtol=RTOL)
