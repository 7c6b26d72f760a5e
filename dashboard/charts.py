"""Altair charts (Streamlit renders Vega-Lite from its own bundle: no network needed)."""
from __future__ import annotations

import altair as alt
import pandas as pd

_HEIGHT_PER_LAYER_PX = 18
_MIN_HEIGHT_PX = 160


def heatmap(df: pd.DataFrame, value: str, title: str, scheme: str = "viridis") -> alt.Chart:
    """Layer (rows, layer 0 on top) x head (columns) coloured by `value`."""
    layers = int(df["layer"].nunique()) if len(df) else 1
    return alt.Chart(df, title=title).mark_rect().encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer", sort="ascending",
                scale=alt.Scale(paddingInner=0.02)),
        color=alt.Color(f"{value}:Q", title=value, scale=alt.Scale(scheme=scheme)),
        tooltip=["layer:O", "head:O", alt.Tooltip(f"{value}:Q", format=".4f"), "samples:Q"],
    # A discrete y axis ignores a pixel height under Streamlit's "fit" autosize: size the
    # rows instead, so a 3-layer model still gets a readable map and a 30-layer one fits.
    ).properties(height=alt.Step(max(_HEIGHT_PER_LAYER_PX, _MIN_HEIGHT_PX // layers)))


def per_layer_bars(df: pd.DataFrame, value: str, title: str, axis_title: str) -> alt.Chart:
    return alt.Chart(df, title=title).mark_bar().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y(f"{value}:Q", title=axis_title),
        tooltip=["layer:O", alt.Tooltip(f"{value}:Q", format=".4f"), "samples:Q"],
    ).properties(height=220)


def per_layer_lines(df: pd.DataFrame, title: str, axis_title: str) -> alt.Chart:
    """Long-form df (layer, series, value): one line per series."""
    return alt.Chart(df, title=title).mark_line(point=True).encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("value:Q", title=axis_title, scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("series:N", title=None),
        tooltip=["layer:O", "series:N", alt.Tooltip("value:Q", format=".3f")],
    ).properties(height=220)


def latency_over_time(df: pd.DataFrame) -> alt.Chart:
    """df: time (datetime), query_class, latency_ms, requests; one line per query class."""
    return alt.Chart(df, title="Request latency over time, per query class").mark_line(
        point=True).encode(
        x=alt.X("time:T", title="time (UTC)", axis=alt.Axis(format="%H:%M:%S", labelAngle=0)),
        y=alt.Y("latency_ms:Q", title="mean latency (ms)"),
        color=alt.Color("query_class:N", title="query class"),
        tooltip=[alt.Tooltip("time:T", format="%H:%M:%S"), "query_class:N",
                 alt.Tooltip("latency_ms:Q", format=".1f"), "requests:Q"],
    ).properties(height=260)


def before_after(df: pd.DataFrame, title: str, unit: str) -> alt.Chart:
    """df: trial, side ('before'|'after'), value: grouped bars per trial."""
    return alt.Chart(df, title=title).mark_bar().encode(
        x=alt.X("side:N", title=None, sort=["before", "after"]),
        y=alt.Y("value:Q", title=unit),
        color=alt.Color("side:N", legend=None, sort=["before", "after"]),
        column=alt.Column("trial:N", title=None),
        tooltip=["trial:N", "side:N", alt.Tooltip("value:Q", format=".3f")],
    ).properties(width=70, height=180)
