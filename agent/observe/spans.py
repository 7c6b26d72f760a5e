"""One OpenTelemetry span per request, built after the fact from its RequestRecord.

Uses the OpenTelemetry API only: without an SDK TracerProvider configured by the user the
tracer is a no-op and this costs a few attribute lookups.
"""
from __future__ import annotations

import math
from typing import Optional

from opentelemetry import trace

from agent.records import RequestRecord

TRACER_NAME = "headroom.agent"
SPAN_NAME = "headroom.request"


def request_tracer(provider: Optional[trace.TracerProvider] = None) -> trace.Tracer:
    """The agent's tracer; `provider` None means the global one (a proxy until one is set)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def _attributes(rec: RequestRecord) -> dict:
    attrs = {"headroom.request_id": rec.request_id, "headroom.tenant": rec.tenant,
             "headroom.route": rec.route, "headroom.query_class": rec.query_class,
             "headroom.traced": rec.traced, "headroom.batch_size": rec.batch_size,
             "headroom.prompt_tokens": rec.prompt_tokens, "headroom.output_tokens": rec.output_tokens}
    for name in ("ttft_ms", "tpot_ms", "latency_ms"):
        value = getattr(rec, name)
        if not math.isnan(value):
            attrs[f"headroom.{name}"] = float(value)
    return attrs


def emit_request_span(tracer: trace.Tracer, rec: RequestRecord, end_unix_ns: int) -> None:
    start_ns = rec.start_unix_us * 1000
    span = tracer.start_span(SPAN_NAME, start_time=start_ns)
    if span.is_recording():
        span.set_attributes(_attributes(rec))
    span.end(end_time=end_unix_ns)
