"""SQL over the store that finds candidates for cheaper execution, as plain dataclasses.

Each function takes a DuckDB connection or cursor (e.g. `with store.reader() as cur`) and can be
narrowed to one agent and/or one model fingerprint. NaN or NULL statistics (e.g. tpot_ms of a
one-token request) are left out of every mean and quantile; rows with a NULL index or one
outside the agent's registered structure are left out altogether.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import duckdb


@dataclass(frozen=True)
class HeadUsage:
    layer: int
    head: int
    mean_out_share: float    # share of its layer's o_proj output norm; low = carries little
    mean_entropy: float      # nats
    mean_max_weight: float
    samples: int             # traced requests


@dataclass(frozen=True)
class LayerInfluence:
    layer: int
    mean_influence: float    # 1 - cos(block input, block output); low = the block barely acts
    mean_attn_ms: float
    mean_mlp_ms: float
    samples: int


@dataclass(frozen=True)
class MlpSparsity:
    layer: int
    frac_below_1e3: float
    frac_below_1e2: float    # the ranking key: share of |activation| < 1e-2
    frac_below_1e1: float
    q50: float
    q90: float
    q99: float
    samples: int


@dataclass(frozen=True)
class QueryClassLatency:
    query_class: str
    requests: int
    p50_latency_ms: float
    p90_latency_ms: float
    mean_ttft_ms: float
    mean_tpot_ms: float
    # Over the class's requests that speculated (agent/records.py): accepted / drafted tokens,
    # and output tokens / verifier forwards; NaN when none did.
    speculated_requests: int = 0
    acceptance_rate: float = math.nan
    tokens_per_verify: float = math.nan


def _mean(col: str) -> str:
    return f"avg({col}) FILTER (WHERE NOT isnan({col}))"


# What ingest guarantees, enforced again at read time (a row written by an older control
# plane, or straight into the file, must not break the summary for everyone): indices are not
# NULL and lie inside the structure the agent registered; agents without one are not bounded.
def _registered(dim: str) -> str:
    return (f"coalesce((SELECT max(nullif(a.{dim}, 0)) FROM agents a "
            f"WHERE a.agent_id = s.agent_id), 65536)")


_LAYER_OK = f"s.layer IS NOT NULL AND s.layer < {_registered('num_layers')}"
_HEAD_OK = f"{_LAYER_OK} AND s.head IS NOT NULL AND s.head < {_registered('num_heads')}"


def _where(agent_id: Optional[str], fingerprint: Optional[str],
           *valid: str) -> tuple[str, list]:
    clauses, params = list(valid), []
    if agent_id is not None:
        clauses.append("s.agent_id = ?")
        params.append(agent_id)
    if fingerprint is not None:
        clauses.append("s.agent_id IN (SELECT agent_id FROM agents WHERE fingerprint = ?)")
        params.append(fingerprint)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> list[tuple]:
    """Rows with SQL NULL (a mean over nothing but NaN) as nan."""
    return [tuple(math.nan if v is None else v for v in row)
            for row in con.execute(sql, params).fetchall()]


def least_used_heads(con, *, agent_id: Optional[str] = None, fingerprint: Optional[str] = None,
                     limit: int = 10) -> list[HeadUsage]:
    """Heads with the lowest mean out_share first."""
    where, params = _where(agent_id, fingerprint, _HEAD_OK)
    sql = (f"SELECT layer, head, {_mean('out_share')} AS share, {_mean('entropy')}, "
           f"{_mean('max_weight')}, count(DISTINCT (agent_id, request_id)) FROM head_stats s {where} "
           f"GROUP BY layer, head ORDER BY share ASC NULLS LAST, layer, head LIMIT ?")
    return [HeadUsage(int(r[0]), int(r[1]), *r[2:5], int(r[5]))
            for r in _rows(con, sql, params + [limit])]


def lowest_influence_layers(con, *, agent_id: Optional[str] = None,
                            fingerprint: Optional[str] = None,
                            limit: int = 10) -> list[LayerInfluence]:
    """Layers whose output differs least from their input first."""
    where, params = _where(agent_id, fingerprint, _LAYER_OK)
    sql = (f"SELECT layer, {_mean('influence')} AS influence, {_mean('attn_ms')}, "
           f"{_mean('mlp_ms')}, count(*) FROM layer_stats s {where} "
           f"GROUP BY layer ORDER BY influence ASC NULLS LAST, layer LIMIT ?")
    return [LayerInfluence(int(r[0]), *r[1:4], int(r[4])) for r in _rows(con, sql, params + [limit])]


def sparsest_mlps(con, *, agent_id: Optional[str] = None, fingerprint: Optional[str] = None,
                  limit: int = 10) -> list[MlpSparsity]:
    """Layers whose MLP activations are most often below 1e-2 first."""
    where, params = _where(agent_id, fingerprint, _LAYER_OK)
    stats = ("frac_below_1e3", "frac_below_1e2", "frac_below_1e1", "q50", "q90", "q99")
    sql = (f"SELECT layer, {', '.join(_mean(c) for c in stats)}, count(*) FROM mlp_stats s {where} "
           f"GROUP BY layer ORDER BY 3 DESC NULLS LAST, layer LIMIT ?")
    return [MlpSparsity(int(r[0]), *r[1:7], int(r[7])) for r in _rows(con, sql, params + [limit])]


def latency_by_query_class(con, *, agent_id: Optional[str] = None,
                           fingerprint: Optional[str] = None) -> list[QueryClassLatency]:
    """Per query class: request count, p50/p90 latency, mean TTFT and TPOT, and how its
    speculation drafts; busiest class first."""
    where, params = _where(agent_id, fingerprint)
    ok, spec = "FILTER (WHERE NOT isnan(latency_ms))", "FILTER (WHERE spec_verify_forwards > 0)"
    sql = (f"SELECT query_class, count(*) AS n, quantile_cont(latency_ms, 0.5) {ok}, "
           f"quantile_cont(latency_ms, 0.9) {ok}, {_mean('ttft_ms')}, {_mean('tpot_ms')}, "
           f"count(*) {spec}, sum(spec_accepted) {spec} / nullif(sum(spec_drafted) {spec}, 0), "
           f"sum(output_tokens) {spec} / nullif(sum(spec_verify_forwards) {spec}, 0) "
           f"FROM requests s {where} GROUP BY query_class ORDER BY n DESC, query_class")
    return [QueryClassLatency(r[0], int(r[1]), *r[2:6], int(r[6]), *r[7:9])
            for r in _rows(con, sql, params)]
