"""Tiny randomly initialised models of every supported architecture, for fast tests."""
from __future__ import annotations

import torch


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
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


HF_BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def token_ids(n: int = 12, batch: int = 1, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)
