"""AgentHandle: request boundaries and metrics, sampling, bitwise identity, failure isolation."""
from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.settings import AgentSettings
from tests.builders import ALL_BUILDERS, greedy_plain, tiny_llama, token_ids

TRACE_ALL = AgentSettings(sample_rate=1.0, attn_decode_stride=2)
TRACE_NONE = AgentSettings(sample_rate=0.0)


def _attach(model, settings=TRACE_ALL, **kwargs):
    records = []
    return AgentHandle(model, resolve_structure(model), settings, records.append, **kwargs), records


def _hook_count(model, skip=()) -> int:
    """Hooks on every submodule (not the top-level model), excluding the ids in `skip`."""
    return sum(len([k for k in d if k not in skip]) for m in model.modules() if m is not model
               for d in (m._forward_hooks, m._forward_pre_hooks))


def _generate(model, ids, new_tokens=5):
    with torch.no_grad():
        if not hasattr(model, "generate"):
            return greedy_plain(model, ids, new_tokens)
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _outputs(model, ids):
    with torch.no_grad():
        logits = model(ids)
        logits = getattr(logits, "logits", logits)
    return logits, _generate(model, ids)


@pytest.mark.parametrize("arch", sorted(ALL_BUILDERS))
def test_attach_trace_and_detach_leave_outputs_bitwise_identical(arch):
    model, ids = ALL_BUILDERS[arch](), token_ids(9, batch=2)
    bare_logits, bare_gen = _outputs(model, ids)
    detached = []
    handle, records = _attach(model, on_detach=lambda: detached.append(1))
    traced_logits, traced_gen = _outputs(model, ids)
    assert all(r.traced for r in records) and handle.errors == 0
    handle.detach()
    handle.detach()                                                   # idempotent
    after_logits, after_gen = _outputs(model, ids)
    for logits, gen in ((traced_logits, traced_gen), (after_logits, after_gen)):
        assert torch.equal(logits, bare_logits) and torch.equal(gen, bare_gen)
    assert detached == [1]
    assert _hook_count(model) == 0 and not model._forward_hooks and not model._forward_pre_hooks
    assert "generate" not in vars(model)


def test_untraced_requests_register_no_per_layer_hooks():
    for settings, expect_layer_hooks in ((TRACE_NONE, False), (TRACE_ALL, True)):
        model = tiny_llama()
        handle, records = _attach(model, settings)
        counts = []
        probe = model.model.layers[1].register_forward_pre_hook(
            lambda m, a: counts.append(_hook_count(model, skip={probe.id})))
        with torch.no_grad():
            model(token_ids(6))
        probe.remove()
        assert (counts[0] > 0) == expect_layer_hooks, settings
        assert _hook_count(model) == 0                                # gone after the request
        assert records[0].traced == expect_layer_hooks
        handle.detach()


def test_generate_is_one_request_with_its_token_counts():
    model, ids = tiny_llama(), token_ids(8, batch=2)
    handle, records = _attach(model, TRACE_NONE)
    before_us = time.time_ns() // 1000
    out = _generate(model, ids, new_tokens=6)
    (rec,) = records
    steps = out.shape[1] - 8
    # No mask: every position is real; a batch's tokens are totals over its sequences.
    assert (rec.batch_size, rec.prompt_tokens, rec.output_tokens) == (2, 2 * 8, 2 * steps)
    assert steps >= 2 and not rec.traced and handle.requests_seen == 1
    assert 0 < rec.ttft_ms <= rec.latency_ms and 0 < rec.tpot_ms < rec.latency_ms
    assert rec.ttft_ms + rec.tpot_ms * (steps - 1) <= rec.latency_ms + 1e-6
    assert before_us <= rec.start_unix_us <= time.time_ns() // 1000
    assert (rec.tenant, rec.route, rec.query_class) == ("", "", "")
    assert handle._tracker.longest_tokens == 8 + steps                # per sequence, padded


def _left_padded(pads: list[int], length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, length] and their attention mask with pads[b] leading zeros in row b."""
    ids = token_ids(length, batch=len(pads)).clone()
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def test_token_counts_exclude_padding_from_generate_and_forward_masks():
    model = tiny_llama()
    handle, records = _attach(model, TRACE_NONE)
    ids, mask = _left_padded([0, 3, 7])                              # 8 + 5 + 1 real tokens
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        steps = out.shape[1] - 8
        ids2, mask2 = _left_padded([8, 2])                           # a fully padded row
        model(ids2, attention_mask=mask2)
        model(ids2, attention_mask=mask2[:, None, None, :].float())   # 4-D: not read as padding
    gen, fwd, custom = records
    assert (gen.batch_size, gen.prompt_tokens, gen.output_tokens) == (3, 14, 3 * steps)
    assert (fwd.batch_size, fwd.prompt_tokens, fwd.output_tokens) == (1, 6, 1)
    assert (custom.batch_size, custom.prompt_tokens, custom.output_tokens) == (2, 16, 2)
    handle.detach()


def test_plain_forward_is_one_request_and_nested_calls_join_the_labelled_one():
    model, ids = tiny_llama(), token_ids(5)
    handle, records = _attach(model, TRACE_NONE)
    with torch.no_grad():
        model(ids)
        model(ids)
    assert [r.request_id for r in records] == [1, 2]
    assert records[0].output_tokens == 1 and math.isnan(records[0].tpot_ms)
    with handle.request(tenant="acme", route="/chat", query_class="qa"):
        out = _generate(model, ids, new_tokens=4)
        with handle.request(tenant="ignored"):
            with torch.no_grad():
                model(out)
    assert len(records) == 3
    rec = records[2]
    assert (rec.request_id, rec.tenant, rec.route, rec.query_class) == (3, "acme", "/chat", "qa")
    assert rec.output_tokens == (out.shape[1] - 5) + 1 and rec.prompt_tokens == 5
    with handle.request(tenant="idle"):
        pass                                                          # no forward: nothing to report
    assert len(records) == 3 and handle.requests_seen == 3


def test_sampling_follows_the_seeded_rng():
    model, ids = tiny_llama(layers=1), token_ids(3)
    settings = AgentSettings(sample_rate=0.4, sample_seed=7)
    handle, records = _attach(model, settings)
    with torch.no_grad():
        for _ in range(12):
            model(ids)
    rng = random.Random(7)
    expected = [rng.random() < 0.4 for _ in range(12)]
    assert [r.traced for r in records] == expected and any(expected) and not all(expected)


def test_a_failing_stats_hook_is_counted_and_the_request_goes_on_untraced():
    model, ids = tiny_llama(), token_ids(7, batch=2)
    bare_logits, bare_gen = _outputs(model, ids)

    def broken_probe(attn, args, kwargs):
        raise RuntimeError("probe exploded")
    structure = dataclasses.replace(resolve_structure(model), qk_probe=broken_probe)
    records = []
    handle = AgentHandle(model, structure, TRACE_ALL, records.append)
    logits, gen = _outputs(model, ids)
    assert torch.equal(logits, bare_logits) and torch.equal(gen, bare_gen)
    assert handle.errors == 2                                         # once per request, then off
    assert [r.traced for r in records] == [False, False]
    assert records[1].output_tokens == 2 * (gen.shape[1] - ids.shape[1])   # 2 sequences
    assert _hook_count(model) == 0
    handle.detach()


def test_a_failing_sink_or_forward_does_not_break_the_next_request():
    model, ids = tiny_llama(), token_ids(4)

    def sink(rec):
        raise OSError("sink down")
    handle = AgentHandle(model, resolve_structure(model), TRACE_ALL, sink)
    with torch.no_grad():
        model(ids)
        assert handle.errors == 1
        with pytest.raises(IndexError):
            model(torch.full((1, 3), 10_000))                          # token id out of range
        assert _hook_count(model) == 0
        model(ids)
    assert handle.requests_seen == 2 and handle.errors == 2            # the failed forward: no record
    handle.detach()


def test_each_request_is_one_span_on_the_given_provider():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    model, ids = tiny_llama(), token_ids(6)
    handle, records = _attach(model, TRACE_NONE, tracer_provider=provider)
    with handle.request(tenant="acme", route="/r"):
        _generate(model, ids, new_tokens=3)
    (span,) = exporter.get_finished_spans()
    rec = records[0]
    assert span.name == "headroom.request" and span.instrumentation_scope.name == "headroom.agent"
    assert span.start_time == rec.start_unix_us * 1000
    assert (span.end_time - span.start_time) / 1e6 == pytest.approx(rec.latency_ms, abs=0.01)
    attrs = span.attributes
    assert (attrs["headroom.tenant"], attrs["headroom.route"]) == ("acme", "/r")
    assert attrs["headroom.output_tokens"] == rec.output_tokens == 3
    assert attrs["headroom.ttft_ms"] == pytest.approx(rec.ttft_ms)
    assert attrs["headroom.traced"] is False
    handle.detach()
