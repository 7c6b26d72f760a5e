"""SQL text for the Query RPC, which takes no parameters: every value goes through literal().

Filters come from the UI (picked from values the store itself returned, but treated as
untrusted all the same): strings are quoted with '' doubling, numbers must be finite numbers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Union


def literal(value: Union[str, int, float, bool, None]) -> str:
    """A SQL literal DuckDB reads back as exactly `value`."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"SQL literal: {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("SQL literal: NUL character in a string")
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"SQL literal: unsupported type {type(value).__name__}")


@dataclass(frozen=True)
class TraceFilter:
    """What the Model internals page narrows the traces to; None = no restriction."""
    agent_id: Optional[str] = None
    since_s: Optional[float] = None     # look-back window; None = all time
    tenant: Optional[str] = None
    route: Optional[str] = None
    query_class: Optional[str] = None

    def request_where(self, alias: str = "r", now_s: Optional[float] = None) -> str:
        """WHERE clause over the requests table (aliased), always non-empty."""
        clauses = ["TRUE"]
        for column in ("agent_id", "tenant", "route", "query_class"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{alias}.{column} = {literal(value)}")
        if self.since_s is not None:
            now_s = time.time() if now_s is None else now_s
            clauses.append(f"{alias}.start_us >= {literal(int((now_s - self.since_s) * 1e6))}")
        return "WHERE " + " AND ".join(clauses)


def per_request_stats(table: str, columns: str, group_by: str, f: TraceFilter) -> str:
    """Aggregates of a per-request trace table, only over requests that pass the filter."""
    return (f"SELECT {group_by}, {columns}, count(*) AS samples FROM {table} t "
            f"JOIN requests r ON r.agent_id = t.agent_id AND r.request_id = t.request_id "
            f"{f.request_where('r')} GROUP BY {group_by} ORDER BY {group_by}")


def mean(column: str, alias: str) -> str:
    """NaN-free mean (a one-token request has NaN TPOT, for example)."""
    return f"avg({column}) FILTER (WHERE NOT isnan({column})) AS {alias}"
