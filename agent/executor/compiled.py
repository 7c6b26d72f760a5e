"""execution compile: the decoder stack (the module that holds the blocks, e.g. `model.model`)
is swapped for `CompiledDecoder`, which runs decode steps through torch.compile'd code and
everything else eager.

Why a module swap rather than transformers' own compile of `model.__call__`:
- the agent's top-level hooks (the always-on request metrics) stay outside the compiled region
  and run in Python on every call, so their timings stay true;
- a sampled request's per-layer trace hooks are inside the stack; a compiled graph would skip
  them (dynamo does not guard on hooks), so a call with any hook inside runs eager: its trace
  is complete, it is only slower.

The first decode step of each new shape compiles, inside that call: the request that makes it
waits for the compile (bench/compile_serving.py measures the wait; on a 2-core CPU about a
minute with a cold inductor cache). Compiling on a background thread while serving eager was
tried and dropped: FX tracing inside the compile patches torch.nn.Module.__call__ process-wide,
which broke the serving thread's eager forward ("module is not installed as a submodule"), and
the compile thread starved the serving one of the GIL (single decode steps of seconds).
A compile that fails leaves that shape eager for good, with the error kept in `errors`.

Decode = one new token per sequence with a compileable (static) KV cache: those are the calls
whose shapes repeat. Prefill, dynamic caches and anything else run the eager module.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

_MAX_SHAPES = 4          # distinct decode shapes compiled at most; beyond, eager (no recompile storm)


class CompiledDecoder(nn.Module):
    def __init__(self, inner: nn.Module, mode: str = "default"):
        super().__init__()
        self.inner = inner
        self.mode = mode
        # The modules whose hooks force eager; the executor applies `execution` last, so the
        # stack no longer changes under this wrapper.
        self._watched = list(inner.modules())
        self._compiled = torch.compile(inner.forward, mode=mode, dynamic=False, fullgraph=False)
        self.shapes: list[tuple] = []                    # decode shapes seen, in order
        self.errors: dict[tuple, str] = {}                # shape -> why it stays eager
        self.compiled_calls = self.eager_calls = 0

    def forward(self, *args: Any, **kwargs: Any):
        key = self._decode_shape(args, kwargs)
        if key is None or key in self.errors or self._hooked():
            self.eager_calls += 1
            return self.inner(*args, **kwargs)
        if key not in self.shapes:
            self.shapes.append(key)
            if len(self.shapes) > _MAX_SHAPES:
                self.errors[key] = f"more than {_MAX_SHAPES} decode shapes: this one runs eager"
                return self.forward(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a failed compile must leave the model serving
            # Compilation fails before the step runs, so the cache is untouched: run it eager.
            self.errors[key] = f"{type(e).__name__}: {e}"[:500]
            return self.forward(*args, **kwargs)
        self.compiled_calls += 1
        return out

    def _decode_shape(self, args: tuple, kwargs: dict) -> tuple | None:
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if x is None or x.dim() < 2 or x.shape[1] != 1 or not getattr(cache, "is_compileable", False):
            return None
        # The cache length is part of the shape: a longer request grows the cache (transformers
        # keeps the largest), which is a new shape to compile.
        length = cache.get_max_length() if hasattr(cache, "get_max_length") else None
        return (tuple(x.shape), x.dtype, length)

    def _hooked(self) -> bool:
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:  # on every module
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._watched)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, shapes={len(self.shapes)}, errors={len(self.errors)}"
