"""proto/tables.py is the one definition of the tables: the agent sends exactly its columns in
its order and dtypes, and the control plane's schema holds every table and column it lists."""
import duckdb
import numpy as np
import pytest

from headroom_sidecar.agent.records import to_tables
from headroom_sidecar.controlplane.store import Store
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.tables import (COUNTER_COLUMNS, QUERYABLE_COLUMNS, TELEMETRY_COLUMNS,
                                           Table)
from headroom_sidecar.agent.records import GpuSample
from tests.agent.test_exporter import record  # a request record, traced with real-shaped arrays

NUMPY_WIRE = {np.dtype(np.float32): pb.FLOAT32, np.dtype(np.int64): pb.INT64,
              np.dtype(np.uint16): pb.UINT16, np.dtype(np.uint32): pb.UINT32,
              np.dtype(np.uint64): pb.UINT64, np.dtype(np.bool_): pb.BOOL,
              np.dtype(object): pb.STRING}


@pytest.fixture(scope="module")
def columns(tmp_path_factory) -> dict[str, set[str]]:
    path = tmp_path_factory.mktemp("tables") / "cp.duckdb"
    Store(str(path)).close()
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def test_the_agent_sends_the_contracts_columns_in_order_and_dtype():
    tables = to_tables([record(1, traced=True)], [GpuSample(ts_unix_us=1, device_index=0, available=False)]).columns
    assert set(tables) == set(TELEMETRY_COLUMNS)
    for name, cols in tables.items():
        assert list(cols) == list(TELEMETRY_COLUMNS[name]), name
        assert {c: NUMPY_WIRE[a.dtype] for c, a in cols.items()} == TELEMETRY_COLUMNS[name], name


@pytest.mark.parametrize("table", list(Table))
def test_every_queryable_table_and_column_exists_in_the_store(columns, table):
    expected = set(TELEMETRY_COLUMNS.get(table.value, {})) | set(QUERYABLE_COLUMNS.get(table, ()))
    assert table.value in columns, f"{table.value} is in the contract but not in the schema"
    assert expected - columns[table.value] == set()


def test_the_agents_table_keeps_every_counter(columns):
    assert set(COUNTER_COLUMNS) <= columns["agents"]
    assert set(COUNTER_COLUMNS) <= set(pb.ExportCounters.DESCRIPTOR.fields_by_name)
