"""execution: static KV cache sized from observed requests, compiled decode by module swap
(on the CPU through inductor), eager fallbacks, and an attached agent's metrics under it."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.agent.executor import ExecutorSettings
from headroom_sidecar.agent.executor.compiled import CompiledDecoder
from headroom_sidecar.agent.executor.execution import cache_tokens
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.settings import AgentSettings
from tests.agent.executor import greedy, plan, rig
from tests.builders import tiny_llama, token_ids

STATIC = {"kind": "execution", "static_kv_cache": True, "compile": "none"}
COMPILE = {"kind": "execution", "static_kv_cache": True, "compile": "torch_compile"}
GRAPHS = {"kind": "execution", "static_kv_cache": True, "compile": "cuda_graph"}


def _compiled(model) -> CompiledDecoder:
    (found,) = [m for m in model.modules() if isinstance(m, CompiledDecoder)]
    return found


def _scores(model, n=8):
    out = greedy(model, n=n, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)                  # [n, B, V]


@pytest.mark.parametrize("fixed,seen,expected", [(0, 0, 256), (0, 37, 256), (0, 256, 256),
                                                 (0, 257, 512), (100, 900, 100)])
def test_static_cache_length_from_setting_or_longest_request(fixed, seen, expected):
    assert cache_tokens(fixed, seen) == expected


def test_static_cache_is_sized_from_the_longest_request_and_rolled_back():
    r = rig(tiny_llama())
    r.executor.longest_request_tokens = lambda: 300
    rep = r.executor.apply(plan(r.fingerprint, STATIC))
    gen = r.model.generation_config
    assert (gen.cache_implementation, gen.max_cache_len) == ("static", 512)
    assert "execution: static KV cache of 512 tokens" in rep.notes
    r.executor.rollback()
    assert (gen.cache_implementation, gen.max_cache_len) == (None, None)


def test_negative_static_cache_setting_is_refused():
    with pytest.raises(ValueError, match="static_cache_tokens=-1"):
        ExecutorSettings(static_cache_tokens=-1)


def test_compiled_decode_matches_eager_and_rolls_back_bitwise():
    r = rig(tiny_llama(), settings=ExecutorSettings(static_cache_tokens=64))
    stack, before = r.model.model, greedy(r.model, n=8)
    r.executor.apply(plan(r.fingerprint, STATIC))
    ref_ids, ref_logits = _scores(r.model)                         # static cache, eager
    rep = r.executor.apply(plan(r.fingerprint, COMPILE))
    assert any("decode compiled (default) on cpu" in n for n in rep.notes)
    ids, out_logits = _scores(r.model)
    cd = _compiled(r.model)
    assert cd.inner is stack and not cd.errors
    assert cd.compiled_calls == 7 and cd.eager_calls == 1          # prefill eager, 7 decode steps
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(out_logits, ref_logits, atol=1e-5, rtol=1e-5)
    r.executor.rollback()
    assert r.model.model is stack and torch.equal(greedy(r.model, n=8), before)


def test_a_failed_compile_leaves_that_shape_eager_and_serving():
    r = rig(tiny_llama(), settings=ExecutorSettings(static_cache_tokens=64))
    first = greedy(r.model, n=8)
    r.executor.apply(plan(r.fingerprint, COMPILE))
    cd = _compiled(r.model)
    cd._compiled = _fails                                # what a compile error looks like
    assert torch.equal(greedy(r.model, n=8), first)
    (key,) = cd.shapes
    assert "RuntimeError: inductor failed" in cd.errors[key]
    assert cd.compiled_calls == 0 and cd.eager_calls == 8


def _fails(*args, **kwargs):
    raise RuntimeError("inductor failed")


def test_a_request_that_grows_the_cache_is_a_new_shape_compiled_once():
    r = rig(tiny_llama(), settings=ExecutorSettings(static_cache_tokens=16))
    short_ref, long_ref = greedy(r.model, n=6), greedy(r.model, n=12)    # 7 + 12 - 1 > 16
    r.executor.apply(plan(r.fingerprint, COMPILE))
    assert torch.equal(greedy(r.model, n=6), short_ref)
    cd = _compiled(r.model)
    assert [k[2] for k in cd.shapes] == [16]
    assert torch.equal(greedy(r.model, n=12), long_ref)
    assert [k[2] for k in cd.shapes] == [16, 18] and not cd.errors
    assert torch.equal(greedy(r.model, n=6), short_ref)                 # the grown cache
    assert len(cd.shapes) == 2


def test_a_hook_inside_the_stack_makes_decode_eager_and_fires_every_step():
    r = rig(tiny_llama(), settings=ExecutorSettings(static_cache_tokens=64))
    r.executor.apply(plan(r.fingerprint, COMPILE))
    greedy(r.model, n=4)
    cd, seen = _compiled(r.model), []
    handle = r.structure.layers[1].register_forward_hook(lambda m, a, o: seen.append(1))
    compiled_before = cd.compiled_calls
    greedy(r.model, n=6)
    handle.remove()
    assert len(seen) == 6 and cd.compiled_calls == compiled_before   # prefill + 5 decode, eager
    greedy(r.model, n=6)
    assert cd.compiled_calls == compiled_before + 5 and len(seen) == 6


def test_a_global_module_hook_makes_decode_eager():
    r = rig(tiny_llama(), settings=ExecutorSettings(static_cache_tokens=64))
    r.executor.apply(plan(r.fingerprint, COMPILE))
    greedy(r.model, n=4)
    cd, seen = _compiled(r.model), []
    compiled_before = cd.compiled_calls
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(1))
    try:
        greedy(r.model, n=4)
    finally:
        handle.remove()
    assert cd.compiled_calls == compiled_before and seen


def test_cuda_graph_on_cpu_falls_back_to_eager_and_says_why():
    r = rig(tiny_llama())
    before = greedy(r.model)
    rep = r.executor.apply(plan(r.fingerprint, GRAPHS))
    assert any("fell back to 'none' on cpu (cuda_graph needs CUDA)" in n for n in rep.notes)
    assert not any(isinstance(m, CompiledDecoder) for m in r.model.modules())
    assert torch.equal(greedy(r.model), before)


def test_no_cpp_compiler_falls_back_to_eager_and_says_why():
    # Imported here: torch._inductor imports triton.language, which must not happen at
    # collection, before tests/agent/kernels/conftest.py sets TRITON_INTERPRET.
    from torch._inductor import config as inductor_config
    r = rig(tiny_llama())
    with inductor_config.patch({"cpp.cxx": ("headroom-no-such-compiler",)}):
        rep = r.executor.apply(plan(r.fingerprint, COMPILE))
    assert any("fell back to 'none' on cpu (no C++ compiler" in n for n in rep.notes)
    assert not any(isinstance(m, CompiledDecoder) for m in r.model.modules())


def test_attached_agent_counts_tokens_and_sizes_the_cache_under_compiled_decode():
    model, records = tiny_llama(), []
    r = rig(model)
    s, ex = r.structure, r.executor
    handle = AgentHandle(model, s, AgentSettings(sample_rate=0.0), records.append, executor=ex)
    ids = token_ids(9)
    greedy(model, n=5, ids=ids)
    assert ex.longest_request_tokens() == 9 + 5
    rep = ex.apply(plan(r.fingerprint, COMPILE))
    assert model.generation_config.max_cache_len == 256, rep.notes
    out = greedy(model, n=7, ids=ids)
    rec = records[-1]
    assert (rec.prompt_tokens, rec.output_tokens) == (9, out.shape[1] - 9) == (9, 7)
    assert _compiled(model).compiled_calls == 6 and rec.tpot_ms > 0
    handle.detach()
