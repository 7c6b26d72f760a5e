"""A Query RPC answer (columnar Table, proto/columnar.py) as an Arrow table, SQL NULLs kept.

The control plane encodes with controlplane/query.py encode_result; every client (the CLI's
QueryClient, the dashboard) decodes here. Needs pyarrow (the dashboard has it through streamlit).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from headroom_sidecar.proto import columnar
from headroom_sidecar.proto import headroom_pb2 as pb


def decode_result(table: pb.Table) -> pa.Table:
    """The inverse of encode_result: columnar Table -> Arrow, null_mask rows as nulls."""
    arrays = columnar.decode_table(table)
    out = {}
    for col in table.columns:
        values = arrays[col.name]
        mask = (np.frombuffer(col.null_mask, dtype=np.uint8) != 0) if col.null_mask else None
        if col.dtype == pb.STRING:
            out[col.name] = pa.array(values.tolist(), type=pa.string(), mask=mask)
        else:
            out[col.name] = pa.array(values, mask=mask)
    return pa.table(out)
