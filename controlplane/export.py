"""`headroom-controlplane export --since ISO --to DIR`: raw telemetry and hourly roll-ups as Parquet.

Rows stream from DuckDB as Arrow record batches into pyarrow's Parquet writer, so DuckDB never
needs external file access (the store's connections have it disabled) and memory stays at one
record batch. Each file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from headroom_sidecar.controlplane.retention import RAW_TABLES
from headroom_sidecar.controlplane.schema import ROLLUP_TABLES

_ROWS_PER_BATCH = 64 * 1024
# table -> its time column: raw rows by arrival, roll-ups by their hour.
EXPORT_TABLES = {**{t: "received_at" for t in RAW_TABLES},
                 **{t: "hour" for t in ROLLUP_TABLES.values()}}


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or time as naive UTC (the TIMESTAMP columns' form); no zone = UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 date or time "
                         "(e.g. 2026-11-30 or 2026-11-30T12:00:00Z)") from None
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t.tzinfo else t


def export_parquet(con, since: datetime, out_dir: str) -> dict[str, int]:
    """One `<table>.parquet` per table in EXPORT_TABLES with its rows at or after `since`;
    returns table -> rows written."""
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise ValueError(f"--to {out_dir}: exists and is not a directory")
    target.mkdir(parents=True, exist_ok=True)
    return {table: _export_table(con, table, column, since, target)
            for table, column in EXPORT_TABLES.items()}


def _export_table(con, table: str, column: str, since: datetime, target: Path) -> int:
    reader = con.sql(f"SELECT * FROM {table} WHERE {column} >= ? ORDER BY {column}",
                     params=[since]).to_arrow_reader(_ROWS_PER_BATCH)
    final = target / f"{table}.parquet"
    tmp = target / f".{table}.parquet.{os.getpid()}.tmp"
    rows = 0
    with pq.ParquetWriter(str(tmp), reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    os.replace(tmp, final)
    return rows
