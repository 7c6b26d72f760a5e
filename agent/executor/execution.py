"""execution: static KV cache and compiled / graph-captured decode, via generation settings.

transformers compiles the decode step itself when the cache is static and a compile config is
set (GenerationMixin._valid_auto_compile_criteria); "cuda_graph" is the reduce-overhead
compile mode, which captures CUDA graphs. Nothing in the model is edited. Off CUDA, compile
falls back to eager ("none") and the fallback is reported in the apply notes.
"""
from __future__ import annotations

from torch import nn

from agent.executor.undo import UndoLog
from agent.plan import CompileMode, Execution

_COMPILE_DEVICES = ("cuda",)


def execution_support(model: nn.Module) -> str | None:
    if getattr(model, "generation_config", None) is None:
        return "model has no generation_config (not a transformers generative model)"
    return None


def _compile_config(mode: CompileMode):
    from transformers import CompileConfig
    kind = "reduce-overhead" if mode == CompileMode.CUDA_GRAPH else "default"
    return CompileConfig(fullgraph=False, dynamic=False, mode=kind)


def apply_execution(model: nn.Module, t: Execution, log: UndoLog) -> list[str]:
    """Returns notes (fallbacks taken)."""
    notes, gen = [], model.generation_config
    if t.static_kv_cache:
        log.set_attr(gen, "cache_implementation", "static")
    compile_mode = t.compile
    device = next(model.parameters()).device.type
    if compile_mode != CompileMode.NONE and device not in _COMPILE_DEVICES:
        notes.append(f"execution: compile={compile_mode.value} fell back to 'none' on {device} "
                     "(compiled decode is enabled on CUDA only)")
        compile_mode = CompileMode.NONE
    if compile_mode != CompileMode.NONE:
        log.set_attr(gen, "compile_config", _compile_config(compile_mode))
        log.set_attr(gen, "disable_compile", False)
    else:
        log.set_attr(gen, "disable_compile", True)
    return notes
