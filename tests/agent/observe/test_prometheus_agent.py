"""agent.observe.metrics.start_prometheus: the agent's GenAI histograms on a real /metrics
endpoint after real tiny-model requests; opt-in, loopback by default, closed for good."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from headroom_sidecar.agent import attach
from headroom_sidecar.agent.observe.metrics import start_prometheus
from tests.builders import tiny_llama, token_ids


def _samples(url: str) -> dict:
    """sample name -> [(labels, value)] from one HTTP GET."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _generate(model, n: int, new_tokens: int) -> None:
    with torch.no_grad():
        model.generate(token_ids(n, seed=n), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def test_ttft_histogram_counts_every_request():
    model = tiny_llama()
    with start_prometheus(0) as endpoint:
        handle = attach(model, export_enabled=False, sample_rate=0.0,
                        meter_provider=endpoint.meter_provider)
        try:
            for n, new_tokens in ((5, 3), (6, 1), (7, 2), (4, 2)):
                _generate(model, n, new_tokens)
            s = _samples(endpoint.url)
        finally:
            handle.detach()
    (( _, ttft_count),) = s["gen_ai_server_time_to_first_token_seconds_count"]
    (( _, tpot_count),) = s["gen_ai_server_time_per_output_token_seconds_count"]
    assert ttft_count == 4
    assert tpot_count == 3                          # a one-token request has no TPOT
    ttft_le_inf = [v for lab, v in s["gen_ai_server_time_to_first_token_seconds_bucket"]
                   if lab["le"] == "+Inf"]
    assert ttft_le_inf == [4]
    tokens = {lab["gen_ai_token_type"]: v for lab, v in s["gen_ai_client_token_usage_sum"]}
    assert tokens == {"input": 5 + 6 + 7 + 4, "output": 3 + 1 + 2 + 2}


def test_endpoint_binds_loopback_and_stops_on_close():
    endpoint = start_prometheus(0)
    assert endpoint.host == "127.0.0.1" and endpoint.url.startswith("http://127.0.0.1:")
    assert _samples(endpoint.url) is not None       # serving (no handle yet: target_info only)
    endpoint.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.url, timeout=2)


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_outside_the_range_is_refused(port):
    with pytest.raises(ValueError, match=f"port={port}"):
        start_prometheus(port)


def test_a_taken_port_is_a_clear_error():
    with start_prometheus(0) as first:
        with pytest.raises(OSError, match=f"127.0.0.1:{first.port}"):
            start_prometheus(first.port)
