"""Candidates from a real DuckDB file holding synthetic traces with known means."""
import duckdb
import numpy as np
import pytest

from headroom_sidecar.controlplane.planner.candidates import (CandidateScope, LadderStep, head_candidates,
                                             load_candidates, threshold_ladder)
from headroom_sidecar.controlplane.planner.settings import PlannerSettings

# Means at least 0.015 apart, so the +-0.004 noise cannot reorder them; rows sum to 1.
SHARE = np.array([[0.5, 0.28, 0.22], [0.1, 0.58, 0.32], [0.05, 0.15, 0.8], [0.40, 0.34, 0.26]])  # [L, H]
INFLUENCE = np.array([0.3, 0.05, 0.02, 0.6])                                                # [L]
# per layer: frac_below_1e3, 1e2, 1e1, q50, q90, q99
MLP = {0: (0.05, 0.2, 0.6, 0.07, 0.4, 1.0), 1: (0.3, 0.7, 0.95, 0.004, 0.05, 0.2),
       2: (0.01, 0.05, 0.2, 0.5, 2.0, 4.0), 3: (0.0, 0.01, 0.1, 1.0, 3.0, 5.0)}
SETTINGS = PlannerSettings(min_zero_fraction=0.3, min_step_fraction=0.1)

TABLES = """
CREATE TABLE requests (agent_id VARCHAR, request_id UBIGINT, query_class VARCHAR);
CREATE TABLE head_stats (agent_id VARCHAR, request_id UBIGINT, layer USMALLINT, head USMALLINT,
                         entropy FLOAT, max_weight FLOAT, out_share FLOAT);
CREATE TABLE layer_stats (agent_id VARCHAR, request_id UBIGINT, layer USMALLINT, influence FLOAT,
                          attn_ms FLOAT, mlp_ms FLOAT);
CREATE TABLE mlp_stats (agent_id VARCHAR, request_id UBIGINT, layer USMALLINT, frac_below_1e3 FLOAT,
                        frac_below_1e2 FLOAT, frac_below_1e1 FLOAT, q50 FLOAT, q90 FLOAT, q99 FLOAT);
"""


def share_for(query_class: str) -> np.ndarray:
    """Chat traffic barely uses layer 3's head 0: it only ranks first in the chat scope."""
    share = SHARE.copy()
    if query_class == "chat":
        share[3] = [0.01, 0.55, 0.44]
    return share


def make_traces(path) -> duckdb.DuckDBPyConnection:
    """A DuckDB file with 2 agents x 6 requests of traces around the known means above."""
    c = duckdb.connect(str(path))
    c.execute(TABLES)
    rng = np.random.default_rng(7)
    for agent in ("a1", "a2"):
        for rid in range(1, 7):
            qc = "code" if rid % 2 else "chat"
            c.execute("INSERT INTO requests VALUES (?, ?, ?)", [agent, rid, qc])
            share = share_for(qc) + rng.uniform(-0.004, 0.004, SHARE.shape)   # [L, H]
            c.executemany("INSERT INTO head_stats VALUES (?, ?, ?, ?, 1.0, 0.5, ?)",
                          [[agent, rid, l, h, float(share[l, h])] for l in range(4) for h in range(3)])
            c.executemany("INSERT INTO layer_stats VALUES (?, ?, ?, ?, 0.2, 0.3)",
                          [[agent, rid, l, float(INFLUENCE[l] + rng.uniform(-0.005, 0.005))]
                           for l in range(4)])
            c.executemany("INSERT INTO mlp_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [[agent, rid, l, *MLP[l]] for l in range(4)])
    return c


@pytest.fixture
def con(tmp_path):
    c = make_traces(tmp_path / "traces.duckdb")
    yield c
    c.close()


def expected_head_order(share: np.ndarray) -> list[tuple[int, int]]:
    return sorted(((l, h) for l in range(4) for h in range(3)), key=lambda lh: share[lh])


def test_heads_ranked_by_mean_out_share(con):
    heads = head_candidates(con, CandidateScope())
    mean = (share_for("code") + share_for("chat")) / 2
    assert [(c.layer, c.head) for c in heads] == expected_head_order(mean)
    assert heads[0].samples == 12
    assert heads[0].mean_out_share == pytest.approx(mean[2, 0], abs=0.005)


@pytest.mark.parametrize("query_class, first", [("chat", (3, 0)), ("code", (2, 0))])
def test_query_class_scope_changes_the_ranking(con, query_class, first):
    heads = head_candidates(con, CandidateScope(query_class=query_class))
    assert (heads[0].layer, heads[0].head) == first
    assert [(c.layer, c.head) for c in heads] == expected_head_order(share_for(query_class))
    assert all(c.samples == 6 for c in heads)


def test_agent_scope(con):
    assert all(c.samples == 6 for c in head_candidates(con, CandidateScope(agent_ids=("a2",))))
    assert head_candidates(con, CandidateScope(agent_ids=("nobody",))) == ()
    assert head_candidates(con, CandidateScope(agent_ids=())) == ()


def test_layers_ranked_by_influence_and_int8_covers_all(con):
    c = load_candidates(con, CandidateScope(), SETTINGS)
    assert [x.layer for x in c.layers] == [2, 1, 0, 3]
    assert c.layers[0].mean_ms == pytest.approx(0.5)
    assert c.int8_layers == (2, 1, 0, 3)
    assert (c.num_layers, c.heads_per_layer, c.traced_requests) == (4, {0: 3, 1: 3, 2: 3, 3: 3}, 12)


def test_sparse_layers_and_their_ladders(con):
    c = load_candidates(con, CandidateScope(), SETTINGS)
    # layers 2 and 3 have few near-zero activations (|a| < 0.1 for <= 20 %): not candidates
    assert [s.layer for s in c.sparse_layers] == [1, 0]
    assert c.sparse_layers[0].ladder == (
        LadderStep(0.001, pytest.approx(0.3)), LadderStep(0.004, 0.5),
        LadderStep(0.01, pytest.approx(0.7)), LadderStep(0.05, 0.9), LadderStep(0.1, pytest.approx(0.95)))
    assert [s.threshold for s in c.sparse_layers[1].ladder] == [0.01, 0.07, 0.1, 0.4]


@pytest.mark.parametrize("stats, thresholds, fractions", [
    # estimates from different columns cross: the ladder keeps fractions non-decreasing
    ({"frac_below_1e3": 0.3, "frac_below_1e2": 0.6, "frac_below_1e1": 0.9, "q50": 0.0005, "q90": 0.02},
     [0.0005, 0.001, 0.01, 0.02, 0.1], [0.5, 0.5, 0.6, 0.9, 0.9]),
    # a quantile within 10 % of a fixed threshold is the same step
    ({"frac_below_1e3": 0.0, "frac_below_1e2": 0.5, "frac_below_1e1": 0.95, "q50": 0.0105, "q90": 0.08},
     [0.01, 0.08, 0.1], [0.5, 0.9, 0.95]),
    # nothing near zero, tiny steps dropped
    ({"frac_below_1e3": 0.0, "frac_below_1e2": 0.0, "frac_below_1e1": 0.05, "q50": 0.0, "q90": 0.0},
     [], []),
])
def test_threshold_ladder(stats, thresholds, fractions):
    ladder = threshold_ladder(stats, min_step_fraction=0.1)
    assert [s.threshold for s in ladder] == thresholds
    assert [s.est_zero_fraction for s in ladder] == pytest.approx(fractions)


def test_empty_tables_give_no_candidates(tmp_path):
    c = duckdb.connect(str(tmp_path / "empty.duckdb"))
    c.execute(TABLES)
    cands = load_candidates(c, CandidateScope(), SETTINGS)
    assert (cands.num_layers, cands.heads, cands.layers, cands.sparse_layers) == (0, (), (), ())
    c.close()
