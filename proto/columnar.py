"""numpy columns <-> `headroom.v1.Table`: the one columnar codec agent and control plane share.

A table is a dict of equal-length 1-D numpy arrays (strings as object or unicode arrays).
Numeric columns travel as raw little-endian bytes, so decoding is one np.frombuffer per column.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from headroom_sidecar.proto import headroom_pb2 as pb

_NUMERIC = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.UINT16: np.dtype("<u2"),
    pb.UINT32: np.dtype("<u4"),
    pb.UINT64: np.dtype("<u8"),
    pb.BOOL: np.dtype("?"),
}
_BY_NUMPY = {dt.str: code for code, dt in _NUMERIC.items()}


class ColumnError(ValueError):
    """A table or column that cannot be encoded or decoded; the message names which."""


def _dtype_code(name: str, values: np.ndarray) -> int:
    if values.dtype.kind in ("U", "O", "S"):
        return pb.STRING
    code = _BY_NUMPY.get(values.dtype.newbyteorder("<").str)
    if code is None:
        raise ColumnError(f"column {name!r}: unsupported dtype {values.dtype}")
    return code


def encode_table(name: str, columns: Mapping[str, np.ndarray]) -> pb.Table:
    """Encodes equal-length 1-D arrays as one Table message."""
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ColumnError(f"table {name!r}: columns differ in length: {lengths}")
    table = pb.Table(name=name, num_rows=next(iter(lengths.values()), 0))
    for col_name, values in columns.items():
        values = np.asarray(values)
        code = _dtype_code(col_name, values)
        col = table.columns.add(name=col_name, dtype=code)
        if code == pb.STRING:
            col.strings.extend(str(v) for v in values.tolist())
        else:
            col.data = np.ascontiguousarray(values, dtype=_NUMERIC[code]).tobytes()
    return table


def decode_column(table_name: str, num_rows: int, col: pb.Column) -> np.ndarray:
    """One column as a numpy array (read-only view of the message bytes for numerics)."""
    if col.dtype == pb.STRING:
        values = np.array(list(col.strings), dtype=object)
    elif col.dtype in _NUMERIC:
        dt = _NUMERIC[col.dtype]
        if len(col.data) != num_rows * dt.itemsize:
            raise ColumnError(
                f"table {table_name!r} column {col.name!r}: {len(col.data)} bytes, "
                f"expected {num_rows} rows x {dt.itemsize} bytes")
        values = np.frombuffer(col.data, dtype=dt)
    else:
        raise ColumnError(f"table {table_name!r} column {col.name!r}: unknown dtype {col.dtype}")
    if len(values) != num_rows:
        raise ColumnError(
            f"table {table_name!r} column {col.name!r}: {len(values)} values, expected {num_rows}")
    return values


def decode_table(table: pb.Table) -> dict[str, np.ndarray]:
    """The inverse of encode_table; raises ColumnError naming the bad column."""
    out: dict[str, np.ndarray] = {}
    for col in table.columns:
        if col.name in out:
            raise ColumnError(f"table {table.name!r}: duplicate column {col.name!r}")
        out[col.name] = decode_column(table.name, table.num_rows, col)
    return out
