"""OpenTelemetry signals through providers passed to attach(): gen_ai span attributes and error
status, GenAI latency / token metrics and the exporter's counters (in-memory exporter/reader)."""
from __future__ import annotations

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from headroom_sidecar.agent import attach
from headroom_sidecar.controlplane.metrics import observe_server, unobserve_server
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.agent.test_exporter import wait_until
from tests.builders import tiny_llama, token_ids


@pytest.fixture
def otel():
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield spans, reader, dict(tracer_provider=tracer_provider, meter_provider=meter_provider)
    meter_provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict:
    """metric name -> its data points, from one collection."""
    data = reader.get_metrics_data()
    out = {}
    for rm in (data.resource_metrics if data else []):
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = list(m.data.data_points)
    return out


def _generate(model, ids, new_tokens, mask=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _attach(model, providers, **kw):
    records = []
    handle = attach(model, export_enabled=False, sample_rate=0.0, **providers, **kw)
    handle._tracker._sink = records.append            # the records the span / metrics came from
    return handle, records


def test_span_carries_gen_ai_attributes_without_padding(otel):
    spans, _, providers = otel
    model = tiny_llama()
    handle, records = _attach(model, providers)
    ids = token_ids(6, batch=2, seed=3)                                  # [2, 6]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                                      # row 0 left-padded by 2
    _generate(model, ids, 3, mask)
    (span,) = spans.get_finished_spans()
    a = span.attributes
    assert span.kind is SpanKind.INTERNAL and span.status.status_code is StatusCode.UNSET
    assert a["gen_ai.usage.input_tokens"] == records[0].prompt_tokens == 4 + 6
    assert a["gen_ai.usage.output_tokens"] == records[0].output_tokens == 3 * 2
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.provider.name"] == "pytorch"
    info = handle.model_info                                         # built offline: no HF name
    assert a["gen_ai.request.model"] == info.architecture != "" and info.name == ""
    assert "error.type" not in a
    handle.detach()


def test_a_request_that_raises_ends_with_error_status(otel):
    spans, _, providers = otel
    model, ids = tiny_llama(), token_ids(4)
    handle, records = _attach(model, providers)
    with torch.no_grad():
        with pytest.raises(IndexError):
            model(torch.full((1, 3), 10_000))              # first forward raises: no record
        with pytest.raises(ValueError):
            with handle.request(tenant="acme"):
                model(ids)                                 # one forward done, then the caller fails
                raise ValueError("caller failed")
        model(ids)                                         # and the next request is fine
    failed_forward, failed_block, ok = spans.get_finished_spans()
    assert len(records) == 2 and handle.errors == 0
    for span, error in ((failed_forward, "IndexError"), (failed_block, "ValueError")):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == error
        assert [e.name for e in span.events] == ["exception"]
    assert failed_block.attributes["headroom.tenant"] == "acme"
    assert failed_block.attributes["gen_ai.usage.input_tokens"] == 4
    assert ok.status.status_code is StatusCode.UNSET and "error.type" not in ok.attributes
    handle.detach()


def test_latency_histograms_count_requests_and_token_usage_sums_tokens(otel):
    _, reader, providers = otel
    model = tiny_llama()
    handle, records = _attach(model, providers)
    for n, new_tokens in ((5, 3), (7, 2), (4, 4)):
        _generate(model, token_ids(n, batch=2, seed=n), new_tokens)
    with pytest.raises(IndexError), torch.no_grad():
        model(torch.full((1, 3), 10_000))                  # failed: duration only, with error.type
    p = _points(reader)
    (ttft,) = p["gen_ai.server.time_to_first_token"]
    (tpot,) = p["gen_ai.server.time_per_output_token"]
    assert ttft.count == tpot.count == len(records) == 3
    assert ttft.sum == pytest.approx(sum(r.ttft_ms for r in records) / 1e3)
    assert ttft.attributes["gen_ai.request.model"] == handle.model_info.architecture
    durations = {pt.attributes.get("error.type"): pt.count
                 for pt in p["gen_ai.server.request.duration"]}
    assert durations == {None: 3, "IndexError": 1}
    tokens = {pt.attributes["gen_ai.token.type"]: pt for pt in p["gen_ai.client.token.usage"]}
    assert tokens["input"].sum == sum(r.prompt_tokens for r in records) == 2 * (5 + 7 + 4)
    assert tokens["output"].sum == sum(r.output_tokens for r in records) == 2 * (3 + 2 + 4)
    assert tokens["input"].count == tokens["output"].count == 3
    handle.detach()


def test_a_single_step_request_has_ttft_but_no_tpot(otel):
    _, reader, providers = otel
    model = tiny_llama()
    handle, _ = _attach(model, providers)
    _generate(model, token_ids(5), 1)                      # one decode step: tpot is nan
    _generate(model, token_ids(5), 2)                      # two: the boundary, one tpot point
    p = _points(reader)
    assert p["gen_ai.server.time_to_first_token"][0].count == 2
    assert p["gen_ai.server.time_per_output_token"][0].count == 1
    handle.detach()


def test_exporter_and_ingest_counters_through_a_real_control_plane(otel, tmp_path):
    _, reader, providers = otel
    server = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0))
    observe_server(server.state, server.port, providers["meter_provider"])
    model, ids = tiny_llama(), token_ids(5)
    handle = attach(model, address=server.address, agent_id="otel", sample_rate=0.0,
                    shutdown_timeout_ms=2000, **providers)
    try:
        with torch.no_grad():
            for _ in range(3):
                model(ids)
        assert handle.exporter.flush(5000)
        assert wait_until(lambda: handle.exporter.counters().acked_records == 3)
        counts = {pt.attributes["headroom.outcome"]: pt.value
                  for pt in _points(reader)["headroom.exporter.records"]
                  if pt.attributes["headroom.agent_id"] == "otel"}
        assert counts == {"enqueued": 3, "dropped": 0, "rejected": 0, "sent": 3, "acked": 3,
                          "lost": 0}
        p = _points(reader)                               # the control plane's side of it
        (rows,), (batches,), (agents,) = (p[f"headroom.{n}"] for n in
                                          ("ingest.rows", "ingest.batches", "agents.connected"))
        assert rows.value == handle.exporter.counters().acked_rows >= 3
        assert rows.attributes["server.port"] == server.port
        assert batches.value == server.state.stats.batches >= 1 and agents.value == 1
        assert p["headroom.ingest.errors"][0].value == 0
    finally:
        handle.detach()
        unobserve_server(server.state, providers["meter_provider"])
        server.stop(grace_s=0.5)
    # detached: its exporter is no longer observed (no points, nothing kept alive)
    assert not {"headroom.exporter.records", "headroom.ingest.rows"} & set(_points(reader))
