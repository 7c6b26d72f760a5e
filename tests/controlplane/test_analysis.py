import math

import numpy as np
import pytest

from headroom_sidecar.agent.records import RequestRecord, TraceArrays
from headroom_sidecar.controlplane import analysis
from headroom_sidecar.controlplane.ingest import decode_batch
from headroom_sidecar.controlplane.store import Registration, Store
from headroom_sidecar.proto import headroom_pb2 as pb
from tests.controlplane import helpers as h

# [L=3, H=4]: head (1, 2) carries least, then (0, 3); each row sums to 1.
OUT_SHARE = np.array([[0.30, 0.30, 0.30, 0.10],
                      [0.40, 0.35, 0.05, 0.20],
                      [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
INFLUENCE = np.array([0.5, 0.05, 0.2], dtype=np.float32)            # layers 1, 2, 0
FRAC_BELOW_1E2 = np.array([0.3, 0.1, 0.9], dtype=np.float32)        # layers 2, 0, 1


def _trace(influence: np.ndarray, jitter: float) -> TraceArrays:
    frac = np.stack([FRAC_BELOW_1E2 / 2, FRAC_BELOW_1E2, np.minimum(FRAC_BELOW_1E2 * 1.1, 1)], 1)
    return TraceArrays(
        head_entropy=np.full((3, 4), 1.0 + jitter, np.float32),
        head_max_weight=np.full((3, 4), 0.5, np.float32),
        head_out_share=OUT_SHARE + np.float32(jitter),
        layer_influence=influence + np.float32(jitter), layer_attn_ms=np.ones(3, np.float32),
        layer_mlp_ms=np.full(3, 2.0, np.float32), mlp_frac_below=frac.astype(np.float32),
        mlp_quantiles=np.tile(np.array([0.1, 0.5, 0.9], np.float32), (3, 1)))


def _requests(influence, first_id):
    # "short": latencies 10..50, one with a single token (tpot nan); "long": 100, 200.
    spec = [("short", 10.0 * (i + 1), 2.0, 1.0 if i else math.nan) for i in range(5)]
    spec += [("long", 100.0, 20.0, 3.0), ("long", 200.0, 40.0, 5.0)]
    # "long" speculated: (drafted, accepted, verify forwards, output tokens) per request.
    drafts = {5: (10, 4, 5, 9), 6: (6, 3, 3, 6)}
    return [RequestRecord(request_id=first_id + i, start_unix_us=i, query_class=qc, latency_ms=lat,
                          ttft_ms=ttft, tpot_ms=tpot,
                          **dict(zip(("spec_drafted", "spec_accepted", "spec_verify_forwards",
                                      "output_tokens"), drafts.get(i, (0, 0, 0, 4)))),
                          trace=_trace(influence, 0.001 * (i % 2)) if i < 4 else None)
            for i, (qc, lat, ttft, tpot) in enumerate(spec)]


@pytest.fixture
def cur(tmp_path):
    store = Store(str(tmp_path / "a.duckdb"))
    for agent_id, fp, influence in [("agent-1", "fp-a", INFLUENCE), ("agent-2", "fp-b", INFLUENCE[::-1].copy())]:
        store.register_agent(Registration(agent_id=agent_id, model={"fingerprint": fp}))
        batch = pb.TelemetryBatch(seq=1, tables=h.tables(_requests(influence, 1)))
        store.store_batch(agent_id, 1, decode_batch(batch))
    with store.reader() as c:
        yield c
    store.close()


def test_least_used_heads(cur):
    heads = analysis.least_used_heads(cur, agent_id="agent-1", limit=3)
    assert [(x.layer, x.head) for x in heads] == [(1, 2), (0, 3), (1, 3)]
    assert heads[0].mean_out_share == pytest.approx(0.0505, abs=1e-4)
    assert heads[0].mean_entropy == pytest.approx(1.0005, abs=1e-4)
    assert heads[0].samples == 4


def test_lowest_influence_layers_filter_by_fingerprint(cur):
    a = analysis.lowest_influence_layers(cur, fingerprint="fp-a")
    b = analysis.lowest_influence_layers(cur, fingerprint="fp-b")
    assert [x.layer for x in a] == [1, 2, 0]
    assert [x.layer for x in b] == [1, 0, 2]
    assert a[0].mean_influence == pytest.approx(0.0505, abs=1e-4)
    assert (a[0].mean_attn_ms, a[0].mean_mlp_ms, a[0].samples) == (1.0, 2.0, 4)
    assert analysis.lowest_influence_layers(cur, fingerprint="fp-none") == []
    both = analysis.lowest_influence_layers(cur, limit=1)
    assert both[0].samples == 8


def test_sparsest_mlps(cur):
    mlps = analysis.sparsest_mlps(cur, agent_id="agent-2")
    assert [x.layer for x in mlps] == [2, 0, 1]
    assert mlps[0].frac_below_1e2 == pytest.approx(0.9)
    assert mlps[0].q90 == pytest.approx(0.5)


def test_latency_by_query_class(cur):
    rows = analysis.latency_by_query_class(cur, agent_id="agent-1")
    assert [r.query_class for r in rows] == ["short", "long"]
    short, long = rows
    assert (short.requests, short.p50_latency_ms, short.p90_latency_ms) == (5, 30.0, 46.0)
    assert (short.mean_ttft_ms, short.mean_tpot_ms) == (2.0, 1.0)   # the nan tpot is left out
    assert (long.requests, long.p50_latency_ms, long.p90_latency_ms) == (2, 150.0, 190.0)
    assert (long.mean_ttft_ms, long.mean_tpot_ms) == (30.0, 4.0)
    assert analysis.latency_by_query_class(cur)[0].requests == 10


def test_speculation_per_query_class(cur):
    short, long = analysis.latency_by_query_class(cur, agent_id="agent-1")
    assert long.speculated_requests == 2
    assert long.acceptance_rate == pytest.approx(7 / 16)          # accepted / drafted
    assert long.tokens_per_verify == pytest.approx(15 / 8)        # output tokens / forwards
    assert short.speculated_requests == 0
    assert math.isnan(short.acceptance_rate) and math.isnan(short.tokens_per_verify)
