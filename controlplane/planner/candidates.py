"""Ranked candidates from the traced statistics (head_stats, layer_stats, mlp_stats).

Every list is deterministic: ties are broken by layer, then head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from headroom_sidecar.controlplane.planner.settings import PlannerSettings
from headroom_sidecar.controlplane.rollup import COUNTED_BY
from headroom_sidecar.controlplane.schema import ROLLUP_TABLES

# The fixed |activation| thresholds behind mlp_stats' frac_below_* columns.
_FIXED_STEPS = ((1e-3, "frac_below_1e3"), (1e-2, "frac_below_1e2"), (1e-1, "frac_below_1e1"))
# Magnitude quantiles used as ladder steps: |a| < q50 zeroes about half, < q90 about 90 %.
_QUANTILE_STEPS = (("q50", 0.5), ("q90", 0.9))
# Two ladder steps closer than this (relative) are one step.
_MIN_STEP_RATIO = 1.1


@dataclass(frozen=True)
class CandidateScope:
    """Which traces count: agents running one model fingerprint, and one query class."""
    agent_ids: Optional[tuple[str, ...]] = None   # None: every agent
    query_class: Optional[str] = None             # None: every class (joins `requests` otherwise)


@dataclass(frozen=True)
class HeadCandidate:
    layer: int
    head: int
    mean_out_share: float
    samples: int


@dataclass(frozen=True)
class LayerCandidate:
    layer: int
    mean_influence: float
    mean_ms: float      # attention + MLP time per traced request


@dataclass(frozen=True)
class LadderStep:
    threshold: float
    est_zero_fraction: float   # fraction of activations |a| < threshold, from the traces


@dataclass(frozen=True)
class SparseLayerCandidate:
    layer: int
    frac_below_1e2: float
    ladder: tuple[LadderStep, ...]   # ascending threshold


@dataclass(frozen=True)
class Candidates:
    num_layers: int
    heads_per_layer: dict[int, int]
    heads: tuple[HeadCandidate, ...]            # lowest mean out_share first
    layers: tuple[LayerCandidate, ...]          # lowest mean influence first
    sparse_layers: tuple[SparseLayerCandidate, ...]   # most near-zero activations first
    traced_requests: int

    @property
    def int8_layers(self) -> tuple[int, ...]:
        """Every layer is an int8 candidate; low-influence layers first (most likely to tolerate it)."""
        ranked = [c.layer for c in self.layers]
        return tuple(ranked + sorted(set(range(self.num_layers)) - set(ranked)))


# An index beyond any uint16 layer or head: "no registered bound".
_UNBOUNDED = 1 << 16


@dataclass(frozen=True)
class _Valid:
    """Which rows count, whatever slipped into the file: indices not NULL and inside the
    registered structure (None: no agent registered one), statistics not NULL nor NaN."""
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None

    def clauses(self, *stats: str, heads: bool = False) -> list[str]:
        out = [f"s.layer IS NOT NULL AND s.layer < {self.num_layers or _UNBOUNDED}"]
        if heads:
            out.append(f"s.head IS NOT NULL AND s.head < {self.num_heads or _UNBOUNDED}")
        return out + [f"NOT isnan(s.{c})" for c in stats]   # NULL and NaN both fail this


def registered_structure(con, scope: CandidateScope) -> _Valid:
    """The largest structure the scope's agents registered at hello (max over agents: the
    scope is one model fingerprint in practice); unknown without an agents table or hello."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'agents'"
                       ).fetchone()[0]:
        return _Valid()
    where, params = "", []
    if scope.agent_ids is not None:
        where = f"WHERE agent_id IN ({', '.join('?' * len(scope.agent_ids)) or 'NULL'})"
        params = list(scope.agent_ids)
    layers, heads = con.execute(f"SELECT max(nullif(num_layers, 0)), max(nullif(num_heads, 0)) "
                                f"FROM agents {where}", params).fetchone()
    return _Valid(None if layers is None else int(layers), None if heads is None else int(heads))


def _scope_sql(scope: CandidateScope, valid: Sequence[str] = (),
               rollup: bool = False) -> tuple[str, list]:
    """WHERE clause of the scope; `rollup`: over an *_hourly table, whose rows carry their
    query class (raw rows find theirs in `requests`)."""
    clauses, params = list(valid), []
    if scope.agent_ids is not None:
        clauses.append(f"s.agent_id IN ({', '.join('?' * len(scope.agent_ids)) or 'NULL'})")
        params += list(scope.agent_ids)
    if scope.query_class is not None:
        clauses.append("s.query_class = ?" if rollup else
                       "EXISTS (SELECT 1 FROM requests r WHERE r.agent_id = s.agent_id "
                       "AND r.request_id = s.request_id AND r.query_class = ?)")
        params.append(scope.query_class)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _has_rollups(con, raw: str) -> bool:
    """Whether the file has raw's hourly roll-up table (files written before retention do not)."""
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?",
                            [ROLLUP_TABLES[raw]]).fetchone()[0])


def _pooled(con, raw: str, scope: CandidateScope, valid: _Valid,
            keys: Sequence[str]) -> tuple[str, list]:
    """A relation (keys..., n, <stat>...) pooling raw rows and the hourly roll-ups of hours no
    longer in raw: each <stat> is the mean over all n counted rows (roll-ups weighted by n).
    The two never overlap: rollup.py rolls an hour up in the transaction that deletes it."""
    stats, heads = COUNTED_BY[raw], "head" in keys
    key_sql = ", ".join(f"s.{k}" for k in keys)
    where, params = _scope_sql(scope, valid.clauses(*stats, heads=heads))
    parts = [f"SELECT {key_sql}, count(*) AS n, "
             + ", ".join(f"sum(s.{c}) AS {c}" for c in stats)
             + f" FROM {raw} s {where} GROUP BY {key_sql}"]
    if _has_rollups(con, raw):
        where, more = _scope_sql(scope, valid.clauses(heads=heads) + ["s.n > 0"], rollup=True)
        parts.append(f"SELECT {key_sql}, sum(s.n), "
                     + ", ".join(f"sum(s.{c} * s.n)" for c in stats)
                     + f" FROM {ROLLUP_TABLES[raw]} s {where} GROUP BY {key_sql}")
        params += more
    out_keys = ", ".join(keys)
    sql = (f"SELECT {out_keys}, sum(n) AS n, "
           + ", ".join(f"sum({c}) / sum(n) AS {c}" for c in stats)
           + f" FROM ({' UNION ALL '.join(parts)}) GROUP BY {out_keys}")
    return sql, params


def head_candidates(con, scope: CandidateScope,
                    valid: Optional[_Valid] = None) -> tuple[HeadCandidate, ...]:
    valid = valid or registered_structure(con, scope)
    pooled, params = _pooled(con, "head_stats", scope, valid, ("layer", "head"))
    rows = con.execute(f"SELECT layer, head, out_share, n FROM ({pooled}) "
                       "ORDER BY out_share ASC, layer, head", params).fetchall()
    return tuple(HeadCandidate(int(l), int(h), float(s), int(n)) for l, h, s, n in rows)


def layer_candidates(con, scope: CandidateScope,
                     valid: Optional[_Valid] = None) -> tuple[LayerCandidate, ...]:
    valid = valid or registered_structure(con, scope)
    pooled, params = _pooled(con, "layer_stats", scope, valid, ("layer",))
    rows = con.execute(f"SELECT layer, influence, attn_ms + mlp_ms FROM ({pooled}) "
                       "ORDER BY influence ASC, layer", params).fetchall()
    return tuple(LayerCandidate(int(l), float(i), float(ms)) for l, i, ms in rows)


def sparse_candidates(con, scope: CandidateScope, settings: PlannerSettings,
                      valid: Optional[_Valid] = None) -> tuple[SparseLayerCandidate, ...]:
    """Layers whose MLP activations are mostly near zero, each with its threshold ladder."""
    valid = valid or registered_structure(con, scope)
    pooled, params = _pooled(con, "mlp_stats", scope, valid, ("layer",))
    rows = con.execute(f"SELECT layer, frac_below_1e3, frac_below_1e2, frac_below_1e1, q50, q90 "
                       f"FROM ({pooled}) ORDER BY frac_below_1e2 DESC, layer", params).fetchall()
    out = []
    for layer, f3, f2, f1, q50, q90 in rows:
        ladder = threshold_ladder({"frac_below_1e3": f3, "frac_below_1e2": f2,
                                   "frac_below_1e1": f1, "q50": q50, "q90": q90},
                                  settings.min_step_fraction)
        # Sparse in absolute terms: a quantile step always zeroes its share, near zero or not.
        if f1 >= settings.min_zero_fraction and ladder:
            out.append(SparseLayerCandidate(int(layer), float(f2), ladder))
    return tuple(out)


def threshold_ladder(stats: dict[str, float], min_step_fraction: float) -> tuple[LadderStep, ...]:
    """Thresholds worth a trial, ascending: the fixed ones and the q50/q90 magnitudes."""
    steps = [(t, float(stats[col])) for t, col in _FIXED_STEPS]
    steps += [(float(stats[col]), frac) for col, frac in _QUANTILE_STEPS if stats[col] > 0]
    steps = sorted((float(f"{t:.3g}"), f) for t, f in steps if f >= min_step_fraction)
    ladder: list[LadderStep] = []
    for t, f in steps:
        if ladder and t < ladder[-1].threshold * _MIN_STEP_RATIO:
            continue   # as good as the previous step: not worth its own trial
        # A larger threshold zeroes at least as much: estimates from different columns can cross.
        f = max([f] + [s.est_zero_fraction for s in ladder])
        ladder.append(LadderStep(t, f))
    return tuple(ladder)


def _heads_per_layer(con, scope: CandidateScope, valid: _Valid) -> list[tuple[int, int]]:
    """(layer, distinct heads seen), in raw rows or their roll-ups."""
    where, params = _scope_sql(scope, valid.clauses(heads=True))
    parts = [f"SELECT s.layer, s.head FROM head_stats s {where}"]
    if _has_rollups(con, "head_stats"):
        where, more = _scope_sql(scope, valid.clauses(heads=True), rollup=True)
        parts.append(f"SELECT s.layer, s.head FROM head_stats_hourly s {where}")
        params += more
    return con.execute(f"SELECT layer, count(DISTINCT head) FROM ({' UNION ALL '.join(parts)}) "
                       "GROUP BY layer ORDER BY layer", params).fetchall()


def _traced_requests(con, scope: CandidateScope, valid: _Valid) -> int:
    """Distinct traced requests in raw layer_stats, plus those rolled up: per agent, class and
    hour, the most any one layer saw (a traced request has a row in every layer)."""
    where, params = _scope_sql(scope, valid.clauses())
    traced = con.execute(f"SELECT count(*) FROM (SELECT DISTINCT agent_id, request_id "
                         f"FROM layer_stats s {where})", params).fetchone()[0]
    if _has_rollups(con, "layer_stats"):
        where, params = _scope_sql(scope, valid.clauses(), rollup=True)
        traced += con.execute(f"""SELECT coalesce(sum(m), 0) FROM (
            SELECT max(s.requests) AS m FROM layer_stats_hourly s {where}
            GROUP BY s.agent_id, s.query_class, s.hour)""", params).fetchone()[0]
    return int(traced)


def load_candidates(con, scope: CandidateScope = CandidateScope(),
                    settings: Optional[PlannerSettings] = None) -> Candidates:
    settings = settings or PlannerSettings.resolve()
    valid = registered_structure(con, scope)
    per_layer = _heads_per_layer(con, scope, valid)
    traced = _traced_requests(con, scope, valid)
    layers = layer_candidates(con, scope, valid)
    sparse = sparse_candidates(con, scope, settings, valid)
    # The registered structure when there is one: the traces' largest layer index is only a
    # fallback (an agent cannot grow the model by sending a large index).
    num_layers = valid.num_layers or 1 + max([c.layer for c in layers] + [int(l) for l, _ in per_layer]
                                             + [c.layer for c in sparse] + [-1])
    return Candidates(num_layers, {int(l): int(n) for l, n in per_layer},
                      head_candidates(con, scope, valid), layers, sparse, int(traced))
