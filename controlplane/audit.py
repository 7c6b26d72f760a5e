"""Append-only, hash-chained and HMAC-keyed audit log in DuckDB.

Each row carries `prev_hash` (the previous row's `row_hash`, or 64 zeros for seq 1),
`row_hash = sha256(prev_hash || canonical JSON of [seq, ts_us, kind, actor, subject, details])`
and `mac = HMAC-SHA256(key, prev_mac || row_hash)`, prev_mac being the previous row's MAC
(64 zeros for the first keyed row). The key lives in a file outside the database
(controlplane/audit_key.py); a one-row table `audit_head` holds the last seq, hash and MAC,
written in the same transaction, and the anchor file outside DuckDB gets the same head after
every append.

What `verify()` detects:
- a changed row (any of seq/ts_us/kind/actor/subject/details): its row_hash no longer matches;
- a changed row_hash or prev_hash: the row's own hash or the next row's link breaks;
- a deleted row in the middle: a gap in seq;
- a changed row whose row_hash (and every later one, and the head) was recomputed, or a
  forged row appended with a correct row_hash: its MAC does not match (needs the key);
- a stripped MAC: a row without one after keyed rows, or keyed rows starting later than the
  anchor says;
- a deleted tail (last rows) or a wiped log, even with the head table rewritten: the anchor
  (the anchor file by default, or one copied elsewhere and passed in) names a row the log
  no longer has.
Rows written before the log had a key (older schema) carry no MAC: verify reports them as
`unkeyed_before_seq` and can vouch for them only through the plain hash chain.
Timestamps are wall clock and are recorded, not checked for order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import duckdb

from headroom_sidecar.controlplane.audit_key import (AuditSettings, load_or_create_key, read_anchor,
                                    write_anchor)
from headroom_sidecar.controlplane.schema import AUDIT_DDL
from headroom_sidecar.proto.contract import AuditKind

GENESIS_HASH = "0" * 64
_VERIFY_CHUNK_ROWS = 2048


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
    mac: str = ""     # "" for a row written before the log had a key


@dataclass(frozen=True)
class AuditHead:
    """The chain's last row; copied elsewhere it is an anchor for verify."""
    seq: int              # 0 for an empty log
    row_hash: str         # GENESIS_HASH for an empty log
    mac: str = ""         # the last row's MAC ("" : unkeyed, or not part of this anchor)
    keyed_since: int = 0  # the first row with a MAC (0: none, or not part of this anchor)

    @classmethod
    def from_dict(cls, d: dict) -> "AuditHead":
        """An anchor as the anchor file or verify's `head` spells it; ValueError says what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"anchor: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"seq", "row_hash", "mac", "keyed_since"})
        if unknown:
            raise ValueError(f"anchor: unknown field(s) {', '.join(unknown)}")
        seq, keyed = d.get("seq"), d.get("keyed_since", 0) or 0
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"anchor: seq must be an integer >= 0, got {seq!r}")
        if isinstance(keyed, bool) or not isinstance(keyed, int) or keyed < 0:
            raise ValueError(f"anchor: keyed_since must be an integer >= 0, got {keyed!r}")
        texts = {k: d.get(k) or "" for k in ("row_hash", "mac")}
        for k, v in texts.items():
            if not isinstance(v, str) or (v and len(v) != 64):
                raise ValueError(f"anchor: {k} must be 64 hex digits, got {v!r}")
        return cls(seq, texts["row_hash"], texts["mac"], keyed)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int
    first_bad_seq: Optional[int] = None
    reason: str = ""
    # Rows below this seq were written before the log had a key: checked by hash only.
    unkeyed_before_seq: Optional[int] = None


# The tables (and the migration from the unkeyed schema: older rows keep mac NULL, "unkeyed
# before seq N") are schema.py's, under the schema version; run here for a bare connection.
_ROW_COLUMNS = "seq, ts_us, kind, actor, subject, details_json, prev_hash, row_hash, mac"


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(AUDIT_DDL)


def canonical_json(value: Any) -> str:
    """The one JSON spelling that is hashed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def row_hash(prev_hash: str, seq: int, ts_us: int, kind: str, actor: str, subject: str,
             details: dict) -> str:
    body = canonical_json([seq, ts_us, kind, actor, subject, details])
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def row_mac(key: bytes, prev_mac: str, row_hash_hex: str) -> str:
    """HMAC-SHA256 over the previous MAC and this row's hash (which covers its content)."""
    return hmac.new(key, (prev_mac + row_hash_hex).encode("ascii"), hashlib.sha256).hexdigest()


def _db_path(con: duckdb.DuckDBPyConnection) -> Optional[str]:
    got = con.execute("SELECT path FROM duckdb_databases() "
                      "WHERE database_name = current_database()").fetchone()
    return got[0] if got and got[0] else None


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
    not call it inside one opened on `con`. settings: where the key and anchor files are
    (default: next to con's database file; an in-memory database gets a per-process key).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, lock: Optional[threading.Lock] = None,
                 settings: Optional[AuditSettings] = None):
        self._con = con
        self._lock = lock if lock is not None else threading.RLock()
        with self._lock:
            ensure_schema(con)
            self._settings = settings or AuditSettings.resolve(_db_path(con))
        self._key = load_or_create_key(self._settings.key_file)

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
            mac = row_mac(self._key, head.mac or GENESIS_HASH, digest)
            new_head = AuditHead(seq, digest, mac, head.keyed_since or seq)
            self._insert((seq, ts_us, kind.value, actor, subject, details_json, head.row_hash,
                          digest, mac), new_head)
            write_anchor(self._settings.anchor_file, dataclasses.asdict(new_head))
        return AuditRow(seq, ts_us, kind, actor, subject, json.loads(details_json),
                        head.row_hash, digest, mac)

    def _insert(self, row: tuple, head: AuditHead) -> None:
        con = self._con
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"INSERT INTO audit_log ({_ROW_COLUMNS}) VALUES "
                        f"(?, ?, ?, ?, ?, ?, ?, ?, ?)", list(row))
            con.execute("INSERT OR REPLACE INTO audit_head (id, seq, row_hash, mac, keyed_since) "
                        "VALUES (1, ?, ?, ?, ?)",
                        [head.seq, head.row_hash, head.mac, head.keyed_since])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _head(self, con: Optional[duckdb.DuckDBPyConnection] = None) -> AuditHead:
        got = (con or self._con).execute(
            "SELECT seq, row_hash, mac, keyed_since FROM audit_head WHERE id = 1").fetchone()
        if got is None:
            return AuditHead(0, GENESIS_HASH)
        return AuditHead(int(got[0]), got[1], got[2] or "", int(got[3] or 0))

    def head(self) -> AuditHead:
        """The last seq, hash and MAC: copy it elsewhere to pin the log up to here (see verify)."""
        with self._lock:
            return self._head()

    def rows(self, kind: AuditKind | str | None = None, subject: Optional[str] = None,
             actor: Optional[str] = None, text: Optional[str] = None,
             after_seq: Optional[int] = None, limit: int = 100,
             newest_first: bool = True) -> list[AuditRow]:
        """Filtered rows. `text` matches case-insensitively in actor, subject or details."""
        where, params = _filters(kind, subject, actor, text, after_seq)
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_ROW_COLUMNS} FROM audit_log {where} ORDER BY seq {order} LIMIT ?"
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        with self._lock:
            got = self._con.execute(sql, params + [int(limit)]).fetchall()
        return [_to_row(r) for r in got]

    def count(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT count(*) FROM audit_log").fetchone()[0])

    def verify(self, anchor: Optional[AuditHead] = None) -> VerifyResult:
        """Walk the chain from seq 1; the first broken link names the seq and why.

        anchor: a head copied elsewhere earlier; None checks against the anchor file."""
        if anchor is None:
            try:
                anchor = self._file_anchor()
            except ValueError as e:
                return VerifyResult(False, 0, None, str(e))
        with self._lock:
            cur = self._con.cursor()
        try:
            # One transaction: the head and the rows come from the same snapshot, so
            # appends running meanwhile neither block the walk nor look like tampering.
            cur.execute("BEGIN TRANSACTION")
            head = self._head(cur)
            cur.execute(f"SELECT {_ROW_COLUMNS} FROM audit_log ORDER BY seq")
            result = _Walk(self._key, anchor).run(_chunks(cur), head)
            cur.execute("ROLLBACK")
        finally:
            cur.close()
        return result

    def _file_anchor(self) -> Optional[AuditHead]:
        path = self._settings.anchor_file
        got = read_anchor(path) if path else None
        if got is None:
            return None
        try:
            return AuditHead.from_dict(got)
        except ValueError as e:
            raise ValueError(f"audit anchor file {path}: {e}") from None


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
    return AuditRow(int(r[0]), int(r[1]), AuditKind(r[2]), r[3], r[4], json.loads(r[5]), r[6], r[7],
                    r[8] or "")


def _chunks(cur) -> Iterator[tuple]:
    while True:
        batch = cur.fetchmany(_VERIFY_CHUNK_ROWS)
        if not batch:
            return
        yield from batch


class _Walk:
    """One pass over the rows in seq order: the hash chain, the MAC chain, the head, the anchor."""

    def __init__(self, key: bytes, anchor: Optional[AuditHead]):
        self.key, self.anchor = key, anchor
        self.prev, self.prev_mac = GENESIS_HASH, GENESIS_HASH
        self.checked, self.last_seq, self.keyed_since = 0, 0, 0

    def run(self, rows: Iterator[tuple], head: AuditHead) -> VerifyResult:
        for r in rows:
            bad = _check_row(r, self.last_seq + 1, self.prev) or self._check_mac(r) \
                or self._check_anchor_row(r)
            if bad is not None:
                return self._fail(*bad)
            self.checked, self.last_seq, self.prev = self.checked + 1, r[0], r[7]
        bad = _check_head(self.last_seq, self.prev, self.prev_mac, self.keyed_since, head) \
            or self._check_anchor_end()
        if bad is not None:
            return self._fail(*bad)
        return VerifyResult(True, self.checked, unkeyed_before_seq=self._unkeyed_before())

    def _fail(self, seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, self.checked, seq, reason, self._unkeyed_before())

    def _unkeyed_before(self) -> Optional[int]:
        first_keyed = self.keyed_since or self.last_seq + 1
        return first_keyed if first_keyed > 1 else None

    def _check_mac(self, r: tuple) -> Optional[tuple[int, str]]:
        seq, stored = r[0], r[8]
        if not stored:
            keyed = self.keyed_since or (self.anchor.keyed_since if self.anchor else 0)
            if keyed and seq >= keyed:
                said = "" if self.keyed_since else " by the anchor"
                return seq, (f"row {seq} has no MAC, but rows from {keyed} on are keyed{said}: "
                             f"MACs were stripped, or the row was added outside the log")
            return None
        expected = row_mac(self.key, self.prev_mac, r[7])
        if not hmac.compare_digest(expected, stored):
            return seq, (f"row {seq}'s MAC does not match: the row was edited, its chain "
                         f"recomputed or forged without the audit key (or the key file changed)")
        self.prev_mac, self.keyed_since = stored, self.keyed_since or seq
        return None

    def _check_anchor_row(self, r: tuple) -> Optional[tuple[int, str]]:
        a = self.anchor
        if a is None or r[0] != a.seq:
            return None
        if a.row_hash and r[7] != a.row_hash:
            return r[0], "row_hash differs from the anchor"
        if a.mac and (r[8] or "") != a.mac:
            return r[0], "MAC differs from the anchor"
        return None

    def _check_anchor_end(self) -> Optional[tuple[int, str]]:
        a = self.anchor
        if a is None:
            return None
        if a.seq > self.last_seq:
            what = "the log is empty (wiped)" if self.last_seq == 0 else \
                f"the log ends at row {self.last_seq} (rows removed from the tail)"
            return self.last_seq + 1, f"anchor names row {a.seq} but {what}"
        if a.keyed_since and a.keyed_since != self.keyed_since:
            return a.keyed_since, (f"the anchor says MACs start at row {a.keyed_since}, the log "
                                   f"has them from row {self.keyed_since or 'nowhere'}: "
                                   f"MACs were stripped or the chain was rebuilt")
        return None


def _check_row(r: tuple, expected_seq: int, prev: str) -> Optional[tuple[int, str]]:
    """None if row r continues the hash chain; else (bad seq, reason)."""
    seq, ts_us, kind, actor, subject, details_json, prev_hash, stored = r[:8]
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


def _check_head(last_seq: int, last_hash: str, last_mac: str, keyed_since: int,
                head: AuditHead) -> Optional[tuple[int, str]]:
    if last_seq < head.seq:
        return last_seq + 1, f"rows {last_seq + 1}..{head.seq} are missing (the head names row {head.seq})"
    if last_seq > head.seq:
        return head.seq + 1, f"rows {head.seq + 1}..{last_seq} were not appended through the log"
    if last_hash != head.row_hash:
        return last_seq, f"row {last_seq}'s row_hash differs from the head"
    if keyed_since and (head.mac != last_mac or head.keyed_since != keyed_since):
        return last_seq, f"row {last_seq}'s MAC or first keyed row differs from the head"
    return None
