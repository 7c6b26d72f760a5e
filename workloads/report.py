"""Plain-text tables for the demo and benchmarks."""
from __future__ import annotations

import math
from typing import Any, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = ([title] if title else []) + [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths))
            for r in cells]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace("%", "").replace("x", "").isdigit()


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_learned(summary: dict) -> None:
    """What the control plane learned from the traces (the analysis.summary admin command)."""
    print("\n== what the control plane learned ==")
    print(table(["layer", "head", "mean out share", "entropy (nats)", "max weight", "requests"],
                [[h["layer"], h["head"], h["mean_out_share"], h["mean_entropy"],
                  h["mean_max_weight"], h["samples"]] for h in summary["least_used_heads"]],
                title="least used heads (smallest share of their layer's attention output)"))
    print()
    print(table(["layer", "influence (1-cos)", "attn ms", "mlp ms", "requests"],
                [[l["layer"], l["mean_influence"], l["mean_attn_ms"], l["mean_mlp_ms"], l["samples"]]
                 for l in summary["lowest_influence_layers"]],
                title="lowest-influence layers"))
    print()
    print(table(["layer", "|a|<1e-3", "|a|<1e-2", "|a|<1e-1", "q50 |a|", "q90 |a|"],
                [[m["layer"], m["frac_below_1e3"], m["frac_below_1e2"], m["frac_below_1e1"],
                  m["q50"], m["q90"]] for m in summary["sparsest_mlps"]],
                title="sparsest MLPs"))
    print()
    print(table(["query class", "requests", "p50 latency ms", "p90 latency ms", "TTFT ms", "TPOT ms"],
                [[q["query_class"], q["requests"], q["p50_latency_ms"], q["p90_latency_ms"],
                  q["mean_ttft_ms"], q["mean_tpot_ms"]] for q in summary["latency_by_query_class"]],
                title="latency per request class"))
