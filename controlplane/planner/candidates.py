"""Ranked candidates from the traced statistics (head_stats, layer_stats, mlp_stats).

Every list is deterministic: ties are broken by layer, then head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from controlplane.planner.settings import PlannerSettings

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


def _scope_sql(scope: CandidateScope, valid: Sequence[str] = ()) -> tuple[str, list]:
    clauses, params = list(valid), []
    if scope.agent_ids is not None:
        clauses.append(f"s.agent_id IN ({', '.join('?' * len(scope.agent_ids)) or 'NULL'})")
        params += list(scope.agent_ids)
    if scope.query_class is not None:
        clauses.append("EXISTS (SELECT 1 FROM requests r WHERE r.agent_id = s.agent_id "
                       "AND r.request_id = s.request_id AND r.query_class = ?)")
        params.append(scope.query_class)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def head_candidates(con, scope: CandidateScope,
                    valid: Optional[_Valid] = None) -> tuple[HeadCandidate, ...]:
    valid = valid or registered_structure(con, scope)
    where, params = _scope_sql(scope, valid.clauses("out_share", heads=True))
    rows = con.execute(f"""
        SELECT layer, head, avg(out_share) AS share, count(*) AS n
        FROM head_stats s {where}
        GROUP BY layer, head ORDER BY share ASC, layer, head""", params).fetchall()
    return tuple(HeadCandidate(int(l), int(h), float(s), int(n)) for l, h, s, n in rows)


def layer_candidates(con, scope: CandidateScope,
                     valid: Optional[_Valid] = None) -> tuple[LayerCandidate, ...]:
    valid = valid or registered_structure(con, scope)
    where, params = _scope_sql(scope, valid.clauses("influence", "attn_ms", "mlp_ms"))
    rows = con.execute(f"""
        SELECT layer, avg(influence) AS infl, avg(attn_ms + mlp_ms) AS ms
        FROM layer_stats s {where}
        GROUP BY layer ORDER BY infl ASC, layer""", params).fetchall()
    return tuple(LayerCandidate(int(l), float(i), float(ms)) for l, i, ms in rows)


def sparse_candidates(con, scope: CandidateScope, settings: PlannerSettings,
                      valid: Optional[_Valid] = None) -> tuple[SparseLayerCandidate, ...]:
    """Layers whose MLP activations are mostly near zero, each with its threshold ladder."""
    valid = valid or registered_structure(con, scope)
    where, params = _scope_sql(scope, valid.clauses("frac_below_1e3", "frac_below_1e2",
                                                    "frac_below_1e1", "q50", "q90"))
    rows = con.execute(f"""
        SELECT layer, avg(frac_below_1e3), avg(frac_below_1e2), avg(frac_below_1e1),
               avg(q50), avg(q90)
        FROM mlp_stats s {where}
        GROUP BY layer ORDER BY avg(frac_below_1e2) DESC, layer""", params).fetchall()
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


def load_candidates(con, scope: CandidateScope = CandidateScope(),
                    settings: Optional[PlannerSettings] = None) -> Candidates:
    settings = settings or PlannerSettings.resolve()
    valid = registered_structure(con, scope)
    where, params = _scope_sql(scope, valid.clauses(heads=True))
    per_layer = con.execute(f"SELECT layer, count(DISTINCT head) FROM head_stats s {where} "
                            "GROUP BY layer ORDER BY layer", params).fetchall()
    where, params = _scope_sql(scope, valid.clauses())
    traced = con.execute(f"SELECT count(*) FROM (SELECT DISTINCT agent_id, request_id "
                         f"FROM layer_stats s {where})", params).fetchone()[0]
    layers = layer_candidates(con, scope, valid)
    sparse = sparse_candidates(con, scope, settings, valid)
    # The registered structure when there is one: the traces' largest layer index is only a
    # fallback (an agent cannot grow the model by sending a large index).
    num_layers = valid.num_layers or 1 + max([c.layer for c in layers] + [int(l) for l, _ in per_layer]
                                             + [c.layer for c in sparse] + [-1])
    return Candidates(num_layers, {int(l): int(n) for l, n in per_layer},
                      head_candidates(con, scope, valid), layers, sparse, int(traced))
