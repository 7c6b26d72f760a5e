"""skip_layers: a skipped block equals a forward hook that returns the block's input."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.executor.skip import IdentityBlock
from tests.agent.executor import greedy, logits, plan, rig
from tests.builders import tiny_llama, tiny_qwen2


class IdentityHooks:
    def __init__(self, s, layers):
        self.handles = [s.blocks[i].module.register_forward_hook(
            lambda mod, args, kwargs, out: kwargs.get("hidden_states", args[0] if args else None),
            with_kwargs=True) for i in layers]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layers", [[0], [1], [0, 2], [3]])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_skip_equals_identity_hook(builder, layers):
    r = rig(builder(layers=4))
    with IdentityHooks(r.structure, layers):
        ref = logits(r.model)
    r.executor.apply(plan(r.fingerprint, {"kind": "skip_layers", "layers": layers}))
    assert all(isinstance(r.structure.layers[i], IdentityBlock) for i in layers)
    torch.testing.assert_close(logits(r.model), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layers", [[0], [1, 2]])
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_with_kv_cache_after_skip(layers, cache):
    # Layer 0 matters most: transformers reads the cache length from the first layer.
    r = rig(tiny_llama(layers=4))
    with IdentityHooks(r.structure, layers):
        ref = greedy(r.model, n=8, cache_implementation=cache)
    r.executor.apply(plan(r.fingerprint, {"kind": "skip_layers", "layers": layers}))
    assert torch.equal(greedy(r.model, n=8, cache_implementation=cache), ref)
