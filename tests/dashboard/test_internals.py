"""Model internals against real traces: the heat maps carry the store's own per-head means,
per-layer charts, latency per query class over time, and the filters narrow all of them."""
import math

import pytest

from tests.dashboard.helpers import chart_titled, charts, no_exception, texts
from tests.dashboard.kit import AGENT, TRAFFIC


def _store_means(world, sql: str, params: list) -> dict:
    with world.server.store.reader() as cur:
        return {tuple(r[:-1]): r[-1] for r in cur.execute(sql, params).fetchall()}


def test_heatmaps_show_every_head_of_the_agent(world, open_app):
    at = open_app(world.address, "internals")
    no_exception(at)
    assert len(charts(at)) == 5
    (entropy,) = chart_titled(at, "Attention entropy")["data"]
    (share,) = chart_titled(at, "Attention share")["data"]
    expected = _store_means(world, "SELECT layer, head, avg(entropy) FROM head_stats "
                                   "WHERE agent_id = ? GROUP BY 1, 2", [AGENT])
    assert len(entropy) == len(expected) == 3 * 4          # tiny_llama: 3 layers x 4 heads
    for r in entropy.itertuples():
        assert math.isclose(r.entropy, expected[(r.layer, r.head)], rel_tol=1e-5)
    # out_share rows sum to 1 per request, so per layer the mean shares sum to 1.
    assert share.groupby("layer")["attention_share"].sum().round(4).eq(1.0).all()


def test_layer_charts_and_latency_per_query_class(world, open_app):
    at = open_app(world.address, "internals")
    (influence,) = chart_titled(at, "Block influence")["data"]
    assert sorted(influence["layer"]) == [0, 1, 2]
    assert influence["influence"].between(0, 2).all()
    (sparsity,) = chart_titled(at, "MLP activation sparsity")["data"]
    assert set(sparsity["series"]) == {"|a| < 1e-3", "|a| < 1e-2", "|a| < 1e-1"}
    assert sparsity["value"].between(0, 1).all()
    (latency,) = chart_titled(at, "latency over time")["data"]
    served = {q for _, _, q in TRAFFIC}
    assert set(latency["query_class"]) == served
    assert latency["requests"].sum() == len(TRAFFIC)


@pytest.mark.parametrize("key,value,requests", [
    ("internals-class", "code", 2), ("internals-tenant", "globex", 3), ("internals-route", "/sum", 1)])
def test_filters_narrow_every_chart(world, open_app, key, value, requests):
    at = open_app(world.address, "internals")
    at.selectbox(key=key).set_value(value).run()
    no_exception(at)
    (latency,) = chart_titled(at, "latency over time")["data"]
    assert latency["requests"].sum() == requests
    (entropy,) = chart_titled(at, "Attention entropy")["data"]
    assert (entropy["samples"] == requests).all()


def test_no_match_says_what_to_do(world, open_app):
    at = open_app(world.address, "internals")
    at.selectbox(key="internals-tenant").set_value("acme").run()
    at.selectbox(key="internals-route").set_value("/sum").run()      # acme never called /sum
    no_exception(at)
    assert not charts(at)
    assert "No traced requests match these filters" in texts(at)
    assert "sample_rate" in texts(at)
    assert "No requests in this range yet" in texts(at)

