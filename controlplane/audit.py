"""Append-only, hash-chained audit log in DuckDB.

Each row carries `prev_hash` (the previous row's `row_hash`, or 64 zeros for seq 1) and
`row_hash = sha256(prev_hash || canonical JSON of [seq, ts_us, kind, actor, subject, details])`.
A one-row table `audit_head` holds the last seq and hash, written in the same transaction.

What `verify()` detects:
- a changed row (any of seq/ts_us/kind/actor/subject/details): its row_hash no longer matches;
- a changed row_hash or prev_hash: the row's own hash or the next row's link breaks;
- a deleted row in the middle: a gap in seq;
- a deleted tail (last rows): the head pointer names a seq or hash the table no longer has;
- a changed row whose row_hash was recomputed: the next row's prev_hash (or the head) breaks.
What it does not detect: someone with write access who rewrites the whole chain from the
changed row on *and* the head. Against that, copy `head()` somewhere else (a ticket, a git
commit, a second system) and pass it back as `verify(anchor=...)`: rows up to the anchor must
still hash to it. Timestamps are wall clock and are recorded, not checked for order.
"""
from __future__ import annotations

import enum
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import duckdb

GENESIS_HASH = "0" * 64
_VERIFY_CHUNK_ROWS = 2048


class AuditKind(str, enum.Enum):
    PROPOSED = "PROPOSED"
    TRIAL_REQUESTED = "TRIAL_REQUESTED"
    TRIAL_RESULT = "TRIAL_RESULT"
    POLICY_EVALUATED = "POLICY_EVALUATED"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    NEEDS_HUMAN = "NEEDS_HUMAN"
    APPLY_REQUESTED = "APPLY_REQUESTED"
    APPLIED = "APPLIED"
    APPLY_FAILED = "APPLY_FAILED"
    ROLLBACK_REQUESTED = "ROLLBACK_REQUESTED"
    ROLLED_BACK = "ROLLED_BACK"
    SUPERSEDED = "SUPERSEDED"
    POLICY_RELOADED = "POLICY_RELOADED"
    AGENT_CONNECTED = "AGENT_CONNECTED"
    AGENT_DISCONNECTED = "AGENT_DISCONNECTED"
    NOTE = "NOTE"


@dataclass(frozen=True)
class AuditRow:
    seq: int
    ts_us: int
    kind: AuditKind
    actor: str
    subject: str
    details: dict
    prev_hash: str
    row_hash: str


@dataclass(frozen=True)
class AuditHead:
    seq: int          # 0 for an empty log
    row_hash: str     # GENESIS_HASH for an empty log


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int
    first_bad_seq: Optional[int] = None
    reason: str = ""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    ts_us BIGINT NOT NULL,
    kind VARCHAR NOT NULL,
    actor VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    details_json VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL,
    row_hash VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY,
    seq BIGINT NOT NULL,
    row_hash VARCHAR NOT NULL
);
"""


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_SCHEMA)


def canonical_json(value: Any) -> str:
    """The one JSON spelling that is hashed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def row_hash(prev_hash: str, seq: int, ts_us: int, kind: str, actor: str, subject: str,
             details: dict) -> str:
    body = canonical_json([seq, ts_us, kind, actor, subject, details])
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _check_actor(actor: str) -> None:
    """Actors say who: 'planner', 'policy-engine', 'operator:<identity>', 'agent:<id>', ..."""
    if not isinstance(actor, str) or not actor.strip():
        raise ValueError("audit actor must be a non-empty string, e.g. 'operator:alice'")
    prefix, sep, rest = actor.partition(":")
    if sep and not rest.strip():
        raise ValueError(f"audit actor {actor!r}: identity after '{prefix}:' is empty")


class AuditLog:
    """The audit log. No update or delete API: rows are only appended.

    Everything that uses `con` must share `lock`; append() opens its own transaction, so do
    not call it inside one opened on `con`.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, lock: Optional[threading.Lock] = None):
        self._con = con
        self._lock = lock if lock is not None else threading.RLock()
        with self._lock:
            ensure_schema(con)

    def append(self, kind: AuditKind | str, actor: str, subject: str,
               details: Optional[dict] = None) -> AuditRow:
        kind = AuditKind(kind)
        _check_actor(actor)
        details = dict(details or {})
        details_json = canonical_json(details)  # fails here on NaN or non-JSON values
        with self._lock:
            head = self._head()
            seq, ts_us = head.seq + 1, time.time_ns() // 1000
            digest = row_hash(head.row_hash, seq, ts_us, kind.value, actor, subject, details)
            self._insert(seq, ts_us, kind.value, actor, subject, details_json, head.row_hash, digest)
        return AuditRow(seq, ts_us, kind, actor, subject, json.loads(details_json),
                        head.row_hash, digest)

    def _insert(self, seq, ts_us, kind, actor, subject, details_json, prev, digest) -> None:
        con = self._con
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [seq, ts_us, kind, actor, subject, details_json, prev, digest])
            con.execute("INSERT OR REPLACE INTO audit_head VALUES (1, ?, ?)", [seq, digest])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _head(self) -> AuditHead:
        got = self._con.execute("SELECT seq, row_hash FROM audit_head WHERE id = 1").fetchone()
        return AuditHead(0, GENESIS_HASH) if got is None else AuditHead(int(got[0]), got[1])

    def head(self) -> AuditHead:
        """The last seq and hash: copy it elsewhere to pin the log up to here (see verify)."""
        with self._lock:
            return self._head()

    def rows(self, kind: AuditKind | str | None = None, subject: Optional[str] = None,
             actor: Optional[str] = None, text: Optional[str] = None,
             after_seq: Optional[int] = None, limit: int = 100,
             newest_first: bool = True) -> list[AuditRow]:
        """Filtered rows. `text` matches case-insensitively in actor, subject or details."""
        where, params = _filters(kind, subject, actor, text, after_seq)
        order = "DESC" if newest_first else "ASC"
        sql = (f"SELECT seq, ts_us, kind, actor, subject, details_json, prev_hash, row_hash "
               f"FROM audit_log {where} ORDER BY seq {order} LIMIT ?")
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        with self._lock:
            got = self._con.execute(sql, params + [int(limit)]).fetchall()
        return [_to_row(r) for r in got]

    def count(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT count(*) FROM audit_log").fetchone()[0])

    def verify(self, anchor: Optional[AuditHead] = None) -> VerifyResult:
        """Walk the chain from seq 1; the first broken link names the seq and why."""
        with self._lock:
            cur = self._con.cursor()
        try:
            # One transaction: the head and the rows come from the same snapshot, so
            # appends running meanwhile neither block the walk nor look like tampering.
            cur.execute("BEGIN TRANSACTION")
            got = cur.execute("SELECT seq, row_hash FROM audit_head WHERE id = 1").fetchone()
            head = AuditHead(0, GENESIS_HASH) if got is None else AuditHead(int(got[0]), got[1])
            cur.execute("SELECT seq, ts_us, kind, actor, subject, details_json, prev_hash, "
                        "row_hash FROM audit_log ORDER BY seq")
            result = _walk(_chunks(cur), head, anchor)
            cur.execute("ROLLBACK")
        finally:
            cur.close()
        return result


def _filters(kind, subject, actor, text, after_seq) -> tuple[str, list]:
    clauses, params = [], []
    if kind is not None:
        clauses.append("kind = ?")
        params.append(AuditKind(kind).value)
    for column, value in (("subject", subject), ("actor", actor)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if text:
        # contains(lower(..)) rather than ILIKE: '%' and '_' in the text are literal
        clauses.append("(contains(lower(actor), ?) OR contains(lower(subject), ?) "
                       "OR contains(lower(details_json), ?))")
        params += [text.lower()] * 3
    if after_seq is not None:
        clauses.append("seq > ?")
        params.append(int(after_seq))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _to_row(r: tuple) -> AuditRow:
    return AuditRow(int(r[0]), int(r[1]), AuditKind(r[2]), r[3], r[4], json.loads(r[5]), r[6], r[7])


def _chunks(cur) -> Iterator[tuple]:
    while True:
        batch = cur.fetchmany(_VERIFY_CHUNK_ROWS)
        if not batch:
            return
        yield from batch


def _check_row(r: tuple, expected_seq: int, prev: str) -> Optional[tuple[int, str]]:
    """None if row r continues the chain; else (bad seq, reason)."""
    seq, ts_us, kind, actor, subject, details_json, prev_hash, stored = r
    if seq != expected_seq:
        return expected_seq, f"row {expected_seq} is missing (next row is {seq})"
    if prev_hash != prev:
        return seq, f"prev_hash does not match row {seq - 1}'s row_hash"
    try:
        details = json.loads(details_json)
        digest = row_hash(prev_hash, seq, ts_us, kind, actor, subject, details)
    except (ValueError, TypeError) as e:
        return seq, f"details_json is not valid JSON: {e}"
    if digest != stored:
        return seq, "row_hash does not match the row's content"
    return None


def _walk(rows: Iterator[tuple], head: AuditHead, anchor: Optional[AuditHead]) -> VerifyResult:
    prev, checked, last_seq = GENESIS_HASH, 0, 0
    for r in rows:
        bad = _check_row(r, last_seq + 1, prev)
        if bad is not None:
            return VerifyResult(False, checked, bad[0], bad[1])
        checked, last_seq, prev = checked + 1, r[0], r[7]
        if anchor is not None and last_seq == anchor.seq and prev != anchor.row_hash:
            return VerifyResult(False, checked, last_seq, "row_hash differs from the anchor")
    bad = _check_head(last_seq, prev, head)
    if bad is not None:
        return VerifyResult(False, checked, bad[0], bad[1])
    if anchor is not None and anchor.seq > last_seq:
        return VerifyResult(False, checked, last_seq + 1,
                            f"anchor names row {anchor.seq} but the log ends at row {last_seq}")
    return VerifyResult(True, checked)


def _check_head(last_seq: int, last_hash: str, head: AuditHead) -> Optional[tuple[int, str]]:
    if last_seq < head.seq:
        return last_seq + 1, f"rows {last_seq + 1}..{head.seq} are missing (the head names row {head.seq})"
    if last_seq > head.seq:
        return head.seq + 1, f"rows {head.seq + 1}..{last_seq} were not appended through the log"
    if last_hash != head.row_hash:
        return last_seq, f"row {last_seq}'s row_hash differs from the head"
    return None
