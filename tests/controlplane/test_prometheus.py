"""The control plane's opt-in Prometheus /metrics endpoint, scraped over real HTTP: ingest
counters after a real agent's batches, Query executions by outcome, the active plan per agent,
one endpoint per process, and nothing served while the setting is off."""
from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from headroom_sidecar.agent import attach
from headroom_sidecar.agent.observe.metrics import start_prometheus
from headroom_sidecar.controlplane import prometheus
from headroom_sidecar.controlplane.prometheus import MetricsEndpointSettings
from headroom_sidecar.controlplane.query import QueryClient, QueryError, QueryErrorKind
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.controlplane.helpers import wait_until
from tests.builders import tiny_llama, token_ids

PORT_ENV = "HEADROOM_CP_METRICS_PORT"


def scrape(url: str) -> dict[str, list]:
    """Prometheus sample name -> [(labels, value)], from one real HTTP GET."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
    assert len(found) == 1, f"{name} {labels}: {samples.get(name)}"
    return found[0]


@pytest.fixture
def metrics_on(monkeypatch):
    monkeypatch.setenv(PORT_ENV, "0")   # a free port; running_endpoint() tells which
    yield
    assert prometheus.running_endpoint() is None, "a test left the endpoint running"


def _start(tmp_path, name="cp"):
    return start_server(ServerSettings(db_path=str(tmp_path / f"{name}.duckdb"), port=0))


def test_scrape_after_real_batches_and_queries(metrics_on, tmp_path):
    server = _start(tmp_path)
    agent_endpoint = start_prometheus(0)
    model, ids = tiny_llama(), token_ids(5)
    handle = attach(model, address=server.address, agent_id="prom", sample_rate=0.0,
                    shutdown_timeout_ms=2000, meter_provider=agent_endpoint.meter_provider)
    try:
        with torch.no_grad():
            for _ in range(3):
                model(ids)
        assert handle.exporter.flush(5000)
        assert wait_until(lambda: handle.exporter.counters().acked_records == 3)
        with QueryClient(server.address) as client:
            assert client.query("SELECT * FROM range(7)").table.num_rows == 7
            assert client.query("SELECT agent_id FROM requests").table.num_rows == 3
            with pytest.raises(QueryError) as bad:
                client.query("DELETE FROM requests")
            assert bad.value.kind is QueryErrorKind.INVALID
        endpoint = prometheus.running_endpoint()
        assert endpoint.host == "127.0.0.1"
        cp = scrape(endpoint.url)
        port = str(server.port)
        assert value(cp, "headroom_ingest_rows_total", server_port=port) == \
            handle.exporter.counters().acked_rows >= 3
        assert value(cp, "headroom_ingest_batches_total", server_port=port) == \
            server.state.stats.batches >= 1
        assert value(cp, "headroom_ingest_errors_total", server_port=port) == 0
        assert value(cp, "headroom_agents_connected", server_port=port) == 1
        assert value(cp, "headroom_ingest_queue_depth", server_port=port) == 0
        assert value(cp, "headroom_query_duration_seconds_count", headroom_outcome="ok") == 2
        assert value(cp, "headroom_query_duration_seconds_count", headroom_outcome="invalid") == 1
        assert value(cp, "headroom_query_rows_total") == 7 + 3
        agent = scrape(agent_endpoint.url)        # the agent's own endpoint: gen_ai histograms
        assert value(agent, "gen_ai_server_time_to_first_token_seconds_count") == 3
        assert value(agent, "headroom_exporter_records_total", headroom_agent_id="prom",
                     headroom_outcome="acked") == 3
        assert "gen_ai_server_time_to_first_token_seconds_count" not in cp
    finally:
        handle.detach()
        agent_endpoint.close()
        server.stop(grace_s=0.5)


def test_active_plan_per_agent_follows_the_latest_application(metrics_on, tmp_path):
    server = _start(tmp_path)
    con, lock = server.store.control_cursor()
    insert = "INSERT INTO applications VALUES (?, ?, 'fleet', ?, '', ?)"
    try:
        with lock:
            for plan, agent, state, ts_us in (("p1", "a", "applied", 1), ("p2", "a", "requested", 2),
                                              ("p1", "b", "applied", 1), ("p1", "b", "rolled_back", 3),
                                              ("p2", "c", "requested", 1)):
                con.execute(insert, [plan, agent, state, ts_us])
        samples = scrape(prometheus.running_endpoint().url)
        active = {(lab["headroom_agent_id"], lab["headroom_plan_id"]): v
                  for lab, v in samples["headroom_plan_active"]}
        assert active == {("a", "p1"): 1}   # p2 only requested on a; b rolled back; c never ran
        with lock:
            con.execute(insert, ["p2", "a", "applied", 4])
        samples = scrape(prometheus.running_endpoint().url)
        assert [lab["headroom_plan_id"] for lab, _ in samples["headroom_plan_active"]] == ["p2"]
    finally:
        con.close()
        server.stop(grace_s=0.5)


def test_one_endpoint_per_process_closed_with_the_last_server(metrics_on, tmp_path):
    first, second = _start(tmp_path, "one"), _start(tmp_path, "two")
    endpoint = prometheus.running_endpoint()
    try:
        ports = {lab["server_port"] for lab, _ in scrape(endpoint.url)["headroom_ingest_rows_total"]}
        assert ports == {str(first.port), str(second.port)}
        first.stop(grace_s=0.5)
        assert prometheus.running_endpoint() is endpoint
        ports = {lab["server_port"] for lab, _ in scrape(endpoint.url)["headroom_ingest_rows_total"]}
        assert ports == {str(second.port)}
    finally:
        second.stop(grace_s=0.5)
    assert prometheus.running_endpoint() is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.url, timeout=2)


def test_nothing_is_served_when_the_setting_is_off(monkeypatch, tmp_path):
    monkeypatch.delenv(PORT_ENV, raising=False)
    assert not MetricsEndpointSettings.resolve().enabled
    server = _start(tmp_path)
    try:
        assert prometheus.running_endpoint() is None
    finally:
        server.stop(grace_s=0.5)


def test_a_taken_port_is_logged_and_the_server_keeps_serving(monkeypatch, tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv(PORT_ENV, str(taken.getsockname()[1]))
        with caplog.at_level(logging.ERROR, logger="headroom_sidecar.controlplane.metrics"):
            server = _start(tmp_path)
        try:
            assert prometheus.running_endpoint() is None
            assert f"{taken.getsockname()[1]}" in caplog.text and PORT_ENV in caplog.text
            with QueryClient(server.address) as client:
                assert client.query("SELECT 1 AS one").table.num_rows == 1
        finally:
            server.stop(grace_s=0.5)


@pytest.mark.parametrize("port, ok", [(-2, False), (-1, True), (0, True), (65535, True),
                                      (65536, False)])
def test_port_setting_bounds(port, ok):
    if ok:
        assert MetricsEndpointSettings(port=port).enabled is (port != -1)
    else:
        with pytest.raises(ValueError, match=f"port={port}"):
            MetricsEndpointSettings(port=port)


def test_env_values_are_checked_and_arguments_win(monkeypatch):
    monkeypatch.setenv(PORT_ENV, "nine")
    with pytest.raises(ValueError, match=PORT_ENV):
        MetricsEndpointSettings.resolve()
    monkeypatch.setenv(PORT_ENV, "9464")
    monkeypatch.setenv("HEADROOM_CP_METRICS_HOST", "0.0.0.0")
    assert MetricsEndpointSettings.resolve() == MetricsEndpointSettings(port=9464, host="0.0.0.0")
    assert MetricsEndpointSettings.resolve(port=-1).enabled is False
    with pytest.raises(ValueError, match="host is empty"):
        MetricsEndpointSettings(port=0, host="")
