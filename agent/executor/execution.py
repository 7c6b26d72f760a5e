"""execution: static KV cache, and compiled / graph-captured decode (see compiled.py).

- static_kv_cache: generate() allocates a fixed-size cache (`cache_implementation="static"`),
  sized `max_cache_len` = the longest request seen so far (prompt + output tokens, rounded up
  to CACHE_ROUND_TOKENS), or ExecutorSettings.static_cache_tokens when set, so later requests
  reuse one shape instead of recompiling per length. A longer request grows the cache once
  (transformers keeps the largest length).
- compile: the decoder stack is swapped for CompiledDecoder; "cuda_graph" is the
  reduce-overhead mode, which captures CUDA graphs and needs CUDA. On a CPU, inductor needs a
  C++ compiler; without one (or without CUDA for cuda_graph) the transform falls back to eager
  and says so in the apply notes. transformers' own auto-compile of `__call__` is disabled:
  the swap replaces it.
- speculative: a draft (prompt n-grams, or this model under a cheaper draft plan) proposes k
  tokens and the model verifies them in one forward; `model.generate` runs that loop (see
  agent/executor/speculative/install.py). Greedy output stays the model's own.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from headroom_sidecar.agent.executor.compiled import CompiledDecoder
from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.proto.plan import CompileMode, Execution
from headroom_sidecar.agent.executor.speculative.install import install_speculative

CACHE_ROUND_TOKENS = 256


def execution_support(model: nn.Module) -> str | None:
    if getattr(model, "generation_config", None) is None:
        return "model has no generation_config (not a transformers generative model)"
    return None


def cache_tokens(fixed: int, longest_seen: int) -> int:
    """The static cache length: `fixed` if set, else the longest request seen, rounded up."""
    if fixed > 0:
        return fixed
    need = max(longest_seen, 1)
    return -(-need // CACHE_ROUND_TOKENS) * CACHE_ROUND_TOKENS


def compile_unavailable(mode: CompileMode, device: str) -> str | None:
    if mode == CompileMode.CUDA_GRAPH and device != "cuda":
        return "cuda_graph needs CUDA"
    if device == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure means: no usable compiler
            return f"no C++ compiler for inductor ({type(e).__name__}: {e})"[:300]
    return None


def decoder_stack(model: nn.Module, layers: nn.ModuleList) -> tuple[nn.Module, str]:
    """(parent, attribute) of the module that holds the block list, below the root."""
    for name, m in model.named_modules():
        if name and any(child is layers for child in m.children()):
            parent, _, leaf = name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), leaf
    raise ValueError("no module below the model root holds the transformer blocks")


def apply_execution(model: nn.Module, layers: nn.ModuleList, t: Execution, log: UndoLog, *,
                    fixed_cache_tokens: int = 0,
                    longest_seen: Callable[[], int] = lambda: 0,
                    draft_builder: Optional[Callable[[tuple], Any]] = None) -> list[str]:
    """Returns notes (the cache length chosen, fallbacks taken). `draft_builder` turns a
    speculative draft plan's transforms into swappable draft modules (the executor's)."""
    notes, gen = [], model.generation_config
    if t.speculative is not None:     # parsers refuse it with a static cache or a compile
        if draft_builder is None and t.speculative.draft_transforms:
            raise ValueError("execution.speculative: a self draft needs the executor's appliers")
        notes += install_speculative(model, t.speculative, log, draft_builder)
    if t.static_kv_cache:
        length = cache_tokens(fixed_cache_tokens, longest_seen())
        log.set_attr(gen, "cache_implementation", "static")
        log.set_attr(gen, "max_cache_len", length)
        notes.append(f"execution: static KV cache of {length} tokens")
    log.set_attr(gen, "disable_compile", True)
    if t.compile == CompileMode.NONE:
        return notes
    device = next(model.parameters()).device.type
    why = compile_unavailable(t.compile, device)
    if why is not None:
        return notes + [f"execution: compile={t.compile.value} fell back to 'none' on {device} ({why})"]
    parent, leaf = decoder_stack(model, layers)
    mode = "reduce-overhead" if t.compile == CompileMode.CUDA_GRAPH else "default"
    log.swap(parent, leaf, CompiledDecoder(getattr(parent, leaf), mode), park=False)
    return notes + [f"execution: decode compiled ({mode}) on {device}; the first decode step "
                    "of each shape waits for its compile"]
