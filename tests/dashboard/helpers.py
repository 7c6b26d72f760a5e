"""Reading what an AppTest rendered: text of every element, charts' Vega-Lite specs and data."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
from streamlit.testing.v1 import AppTest


def texts(at: AppTest) -> str:
    """Everything a reader sees as text (markdown, alerts, captions, code, titles), joined."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "code", "info",
                 "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def tables(at: AppTest) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def charts(at: AppTest) -> list[dict]:
    """Each Altair chart as {'spec': dict, 'data': [DataFrame, ...]}."""
    out = []
    for el in at.get("vega_lite_chart"):
        proto = el.proto
        frames = [_arrow(ds.data.data) for ds in proto.datasets]
        if proto.HasField("data") and proto.data.data:
            frames.append(_arrow(proto.data.data))
        out.append({"spec": json.loads(proto.spec), "data": frames})
    return out


def chart_titled(at: AppTest, words: str) -> dict:
    found = [c for c in charts(at) if words in json.dumps(c["spec"].get("title", ""))]
    assert len(found) == 1, f"{len(found)} charts titled {words!r}: " + \
        ", ".join(str(c["spec"].get("title")) for c in charts(at))
    return found[0]


def _arrow(raw: bytes) -> pd.DataFrame:
    return pa.ipc.open_stream(raw).read_all().to_pandas()
