"""Tiny randomly initialised models of every supported architecture, for fast tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_llama(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    _seeded(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, layers: int = 3):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    _seeded(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int = 0, layers: int = 3):
    from transformers import MistralConfig, MistralForCausalLM
    _seeded(seed)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                        max_position_embeddings=256)
    return MistralForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel
    _seeded(seed)
    # bos/eos inside the tiny vocabulary (GPT-2's defaults, 50256, are not).
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=127, eos_token_id=127)
    return GPT2LMHeadModel(cfg).eval()


HF_BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def _hf(config_cls: str, model_cls: str, seed: int, **cfg):
    import transformers
    _seeded(seed)
    # Special tokens inside the tiny vocabulary (several configs default to ids past 128).
    cfg = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **cfg}
    config = getattr(transformers, config_cls)(**cfg)
    config._attn_implementation = "eager"     # the reference a traced statistic is checked against
    return getattr(transformers, model_cls)(config).eval()


_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, head_dim=16)


def tiny_mistral_sliding(seed: int = 0, layers: int = 3, window: int = 4):
    """Mistral with a sliding window shorter than the test prompts, so the window matters."""
    return _hf("MistralConfig", "MistralForCausalLM", seed, num_hidden_layers=layers,
               sliding_window=window, **_COMMON)


def tiny_qwen3(seed: int = 0, layers: int = 3):
    """q/k RMS norms inside attention."""
    return _hf("Qwen3Config", "Qwen3ForCausalLM", seed, num_hidden_layers=layers, **_COMMON)


def tiny_gemma2(seed: int = 0, layers: int = 3, window: int = 4):
    """Scaled embeddings, attention logit soft-capping, alternating sliding windows."""
    return _hf("Gemma2Config", "Gemma2ForCausalLM", seed, num_hidden_layers=layers,
               sliding_window=window, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
               query_pre_attn_scalar=16, **_COMMON)


def tiny_gemma3(seed: int = 0, layers: int = 3, window: int = 4):
    """Scaled embeddings, q/k norms, sliding windows on most layers."""
    return _hf("Gemma3TextConfig", "Gemma3ForCausalLM", seed, num_hidden_layers=layers,
               sliding_window=window, query_pre_attn_scalar=16, **_COMMON)


def tiny_olmo2(seed: int = 0, layers: int = 3):
    """q/k norms over the whole projection (not per head), norms after attention and MLP."""
    return _hf("Olmo2Config", "Olmo2ForCausalLM", seed, num_hidden_layers=layers,
               **{k: v for k, v in _COMMON.items() if k != "head_dim"})


def tiny_phi3(seed: int = 0, layers: int = 3):
    """Fused qkv_proj and gate_up_proj."""
    return _hf("Phi3Config", "Phi3ForCausalLM", seed, num_hidden_layers=layers,
               **{k: v for k, v in _COMMON.items() if k != "head_dim"})


def tiny_mixtral(seed: int = 0, layers: int = 3):
    """Mixture of experts: 4 experts, 2 per token."""
    return _hf("MixtralConfig", "MixtralForCausalLM", seed, num_hidden_layers=layers,
               num_local_experts=4, num_experts_per_tok=2,
               **{k: v for k, v in _COMMON.items() if k != "head_dim"})


def _eager(build):
    def eager_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.set_attn_implementation("eager")
        return model
    return eager_build


# Every architecture of the test matrix (DESIGN.md "Models to test with"), by name; all eager.
ARCH_BUILDERS = {"llama": _eager(tiny_llama), "mistral_sliding": tiny_mistral_sliding,
                 "qwen2": _eager(tiny_qwen2),
                 "qwen3": tiny_qwen3, "gemma2": tiny_gemma2, "gemma3": tiny_gemma3,
                 "olmo2": tiny_olmo2, "gpt2": _eager(tiny_gpt2), "phi3": tiny_phi3,
                 "mixtral": tiny_mixtral}


def tiny_plain(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    """A hand-written gpt-fast-style transformer (below), no transformers inside."""
    _seeded(seed)
    cfg = PlainConfig(vocab_size=128, n_layer=layers, n_head=heads, n_local_heads=kv_heads,
                      dim=64, intermediate_size=128, block_size=256)
    return PlainTransformer(cfg).eval()


ALL_BUILDERS = {**HF_BUILDERS, "plain": tiny_plain}


def token_ids(n: int = 12, batch: int = 1, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


# --- A plain PyTorch transformer laid out like gpt-fast's model.py (no KV cache: full forwards) ---

@dataclass
class PlainConfig:
    vocab_size: int = 128
    n_layer: int = 3
    n_head: int = 4
    n_local_heads: int = 2          # KV heads (grouped-query attention)
    dim: int = 64
    intermediate_size: int = 128
    block_size: int = 256           # longest sequence RoPE tables cover
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float) -> torch.Tensor:
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)   # [D/2]
    angles = torch.outer(torch.arange(seq_len).float(), freqs)                # [T, D/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)                  # [T, D/2, 2]


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated pairwise by freqs_cis [T, D/2, 2] (gpt-fast's real-valued RoPE)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)                              # [B, T, H, D/2, 2]
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = cfg.n_head, cfg.n_local_heads, cfg.head_dim
        self.dim = cfg.dim
        total = (cfg.n_head + 2 * cfg.n_local_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, total, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), freqs_cis)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B, H, T, D]
        group = self.n_head // self.n_local_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)           # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, self.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class PlainTransformer(nn.Module):
    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg.block_size, cfg.head_dim,
                                                               cfg.rope_base), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]."""
        freqs_cis = self.freqs_cis[: idx.size(1)]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return self.output(self.norm(x))


def greedy_plain(model: nn.Module, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full forwards (the plain model has no cache): [B, T + new_tokens]."""
    for _ in range(new_tokens):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
