"""Observation inside the model process: request metrics always, full traces for a sample.

    requests.py  request boundaries (context / generate / forward), timing, token counts
    trace.py     per-layer hooks of a sampled request, device-side accumulation, one transfer
    stats.py     the device-side reductions (attention entropy, head share, influence, sparsity)
    timing.py    per-layer attention / MLP time (perf_counter on CPU, CUDA events on GPU)
    spans.py     one OpenTelemetry span per request
    metrics.py   OpenTelemetry metrics: GenAI latency / token histograms, exporter counters
"""
from headroom_sidecar.agent.observe.requests import ErrorCount, Labels, Owner, RequestTracker, Sink
from headroom_sidecar.agent.observe.trace import MAX_PREFILL_QUERIES, TraceCollector

__all__ = ["ErrorCount", "Labels", "Owner", "RequestTracker", "Sink", "TraceCollector",
           "MAX_PREFILL_QUERIES"]
