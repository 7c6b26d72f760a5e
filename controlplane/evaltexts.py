"""Real English/technical text already on every machine: Python's own documentation topics.

Topics are split by a stable hash of their name into a calibration part (the planner may look
at it) and a held-out part (only for quality evidence), so the two never overlap.
"""
from __future__ import annotations

import enum
import hashlib

import pydoc_data.topics


class Split(str, enum.Enum):
    CALIBRATION = "calibration"
    HELD_OUT = "held_out"


def _split_of(name: str) -> Split:
    digest = hashlib.sha256(name.encode()).digest()
    return Split.HELD_OUT if digest[0] % 2 else Split.CALIBRATION


def texts(split: Split, max_chars: int | None = None) -> list[str]:
    """Topic texts of one split, in sorted topic order; at most max_chars characters in all."""
    out, total = [], 0
    for name in sorted(pydoc_data.topics.topics):
        if _split_of(name) is not split:
            continue
        body = pydoc_data.topics.topics[name]
        if max_chars is not None and total + len(body) > max_chars:
            body = body[: max_chars - total]
        if body:
            out.append(body)
            total += len(body)
        if max_chars is not None and total >= max_chars:
            break
    return out
