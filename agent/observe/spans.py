"""One OpenTelemetry span per request, built after the fact from its RequestRecord.

Uses the OpenTelemetry API only: without an SDK TracerProvider configured by the user the
tracer is a no-op and this costs a few attribute lookups.

Attributes: headroom's own (`headroom.*`) and the GenAI semantic conventions (`gen_ai.*`,
inference span). Kind INTERNAL: the conventions allow it for a model running in the same
process. A request whose model call raised ends with ERROR status, the exception recorded
and `error.type` set.
"""
from __future__ import annotations

import math
from typing import Optional

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from headroom_sidecar.agent.records import RequestRecord

TRACER_NAME = "headroom.agent"
SPAN_NAME = "headroom.request"
# No chat template is applied by the agent (it sees token ids): a plain completion.
OPERATION_NAME = "text_completion"
PROVIDER_NAME = "pytorch"       # in-process PyTorch model; no well-known provider value fits


def request_tracer(provider: Optional[trace.TracerProvider] = None) -> trace.Tracer:
    """The agent's tracer; `provider` None means the global one (a proxy until one is set)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def gen_ai_base(model_name: str) -> dict:
    """Attributes every request span and metric point shares (computed once per handle)."""
    attrs = {"gen_ai.operation.name": OPERATION_NAME, "gen_ai.provider.name": PROVIDER_NAME}
    if model_name:
        attrs["gen_ai.request.model"] = model_name
    return attrs


def error_type(error: BaseException) -> str:
    """`error.type`: the exception's fully qualified class name."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _attributes(rec: RequestRecord, base: dict) -> dict:
    attrs = {"headroom.request_id": rec.request_id, "headroom.tenant": rec.tenant,
             "headroom.route": rec.route, "headroom.query_class": rec.query_class,
             "headroom.traced": rec.traced, "headroom.batch_size": rec.batch_size,
             "headroom.prompt_tokens": rec.prompt_tokens,
             "headroom.output_tokens": rec.output_tokens,
             # padding excluded, like the record's (see RequestRecord)
             "gen_ai.usage.input_tokens": rec.prompt_tokens,
             "gen_ai.usage.output_tokens": rec.output_tokens, **base}
    for name in ("ttft_ms", "tpot_ms", "latency_ms"):
        value = getattr(rec, name)
        if not math.isnan(value):
            attrs[f"headroom.{name}"] = float(value)
    return attrs


def emit_request_span(tracer: trace.Tracer, rec: RequestRecord, end_unix_ns: int,
                      base: Optional[dict] = None, error: Optional[BaseException] = None) -> None:
    """base: gen_ai_base(model name); error: what the request's model call raised, if it did."""
    start_ns = rec.start_unix_us * 1000
    span = tracer.start_span(SPAN_NAME, kind=SpanKind.INTERNAL, start_time=start_ns)
    if span.is_recording():
        span.set_attributes(_attributes(rec, base or {}))
        if error is not None:
            span.set_attribute("error.type", error_type(error))
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end(end_time=end_unix_ns)
