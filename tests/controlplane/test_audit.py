import dataclasses
import threading

import duckdb
import pytest

from headroom_sidecar.controlplane.audit import GENESIS_HASH, AuditHead, AuditLog, row_hash
from headroom_sidecar.proto.contract import AuditKind


@pytest.fixture
def con(tmp_path):
    c = duckdb.connect(str(tmp_path / "audit.duckdb"))
    yield c
    c.close()


@pytest.fixture
def log(con):
    return AuditLog(con, threading.Lock())


def fill(log: AuditLog, n: int = 6) -> None:
    for i in range(n):
        log.append(AuditKind.PROPOSED if i % 2 == 0 else AuditKind.TRIAL_RESULT, "planner",
                   f"plan-{i // 2}", {"i": i, "top1": 0.98 + i / 1000, "note": "café"})


def test_append_links_rows_and_verifies(log):
    fill(log, 6)
    rows = log.rows(newest_first=False, limit=10)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].prev_hash == GENESIS_HASH
    for a, b in zip(rows, rows[1:]):
        assert b.prev_hash == a.row_hash
    r = rows[2]
    assert r.row_hash == row_hash(r.prev_hash, r.seq, r.ts_us, r.kind.value, r.actor, r.subject, r.details)
    assert log.verify().ok and log.verify().rows_checked == 6
    assert log.head() == AuditHead(6, rows[-1].row_hash, rows[-1].mac, keyed_since=1)


def test_empty_log_verifies(log):
    result = log.verify()
    assert result.ok and result.rows_checked == 0


@pytest.mark.parametrize("sql, bad_seq, words", [
    ("UPDATE audit_log SET details_json = '{\"i\":99}' WHERE seq = 3", 3, "content"),
    ("UPDATE audit_log SET actor = 'operator:mallory' WHERE seq = 4", 4, "content"),
    ("UPDATE audit_log SET kind = 'APPROVED' WHERE seq = 2", 2, "content"),
    ("UPDATE audit_log SET row_hash = repeat('a', 64) WHERE seq = 3", 3, "content"),
    ("UPDATE audit_log SET prev_hash = repeat('b', 64) WHERE seq = 5", 5, "prev_hash"),
    ("DELETE FROM audit_log WHERE seq = 3", 3, "missing"),
    ("DELETE FROM audit_log WHERE seq >= 5", 5, "missing"),
    ("UPDATE audit_head SET row_hash = repeat('c', 64)", 6, "head"),
])
def test_tampering_is_detected_at_its_seq(con, log, sql, bad_seq, words):
    fill(log, 6)
    con.execute(sql)
    result = log.verify()
    assert not result.ok
    assert result.first_bad_seq == bad_seq
    assert words in result.reason


def test_rehashed_edit_is_caught_by_its_mac(con, log):
    fill(log, 5)
    r = log.rows(kind=AuditKind.PROPOSED, subject="plan-1")[0]
    forged = row_hash(r.prev_hash, r.seq, r.ts_us, r.kind.value, "operator:mallory", r.subject, r.details)
    con.execute("UPDATE audit_log SET actor = 'operator:mallory', row_hash = ? WHERE seq = ?",
                [forged, r.seq])
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, r.seq) and "MAC" in result.reason


def test_rewritten_chain_is_caught_by_the_mac_and_an_anchor_kept_elsewhere(con, log):
    fill(log, 4)
    anchor = log.head()
    # Rewrite the whole hash chain consistently (what someone with write access could do).
    rows = log.rows(newest_first=False)
    prev = GENESIS_HASH
    for r in rows:
        actor = "operator:mallory" if r.seq == 2 else r.actor
        h = row_hash(prev, r.seq, r.ts_us, r.kind.value, actor, r.subject, r.details)
        con.execute("UPDATE audit_log SET actor = ?, prev_hash = ?, row_hash = ? WHERE seq = ?",
                    [actor, prev, h, r.seq])
        prev = h
    con.execute("UPDATE audit_head SET row_hash = ?", [prev])
    # Without the key the MACs cannot follow: the edited row is named.
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 2) and "MAC" in result.reason
    result = log.verify(anchor=dataclasses.replace(anchor, mac="", keyed_since=0))
    assert (result.ok, result.first_bad_seq) == (False, 2)


def test_concurrent_appends_keep_the_chain(log):
    def worker(w: int):
        for i in range(25):
            log.append(AuditKind.TRIAL_RESULT, f"agent:a{w}", f"plan-{w}", {"i": i})
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.count() == 100
    result = log.verify()
    assert result.ok and result.rows_checked == 100
    assert sorted(r.seq for r in log.rows(limit=1000)) == list(range(1, 101))


def test_verify_while_appending_sees_a_consistent_snapshot(log):
    fill(log, 10)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            log.append(AuditKind.NOTE, "planner", "x", {})
    t = threading.Thread(target=writer)
    t.start()
    try:
        results = [log.verify() for _ in range(5)]
    finally:
        stop.set()
        t.join()
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]


def test_rows_filters(log):
    fill(log, 6)
    log.append(AuditKind.APPROVED, "operator:alice", "plan-1", {"reason": "looks 100% fine"})
    assert [r.seq for r in log.rows(subject="plan-1")] == [7, 4, 3]
    assert [r.seq for r in log.rows(kind="TRIAL_RESULT", limit=2)] == [6, 4]
    assert [r.actor for r in log.rows(actor="operator:alice")] == ["operator:alice"]
    assert [r.seq for r in log.rows(text="100%")] == [7]     # % is literal, not a wildcard
    assert [r.seq for r in log.rows(text="ALICE")] == [7]
    assert [r.seq for r in log.rows(after_seq=5, newest_first=False)] == [6, 7]


@pytest.mark.parametrize("kind, actor, details, error", [
    ("NOT_A_KIND", "planner", {}, ValueError),
    (AuditKind.NOTE, "", {}, ValueError),
    (AuditKind.NOTE, "operator:", {}, ValueError),
    (AuditKind.NOTE, "planner", {"x": float("nan")}, ValueError),
    (AuditKind.NOTE, "planner", {"x": object()}, TypeError),
])
def test_bad_appends_are_refused_and_leave_the_log_intact(log, kind, actor, details, error):
    fill(log, 2)
    with pytest.raises(error):
        log.append(kind, actor, "s", details)
    assert log.count() == 2 and log.verify().ok


def test_no_update_or_delete_api():
    public = {n for n in dir(AuditLog) if not n.startswith("_")}
    assert public == {"append", "rows", "count", "verify", "head"}


def test_log_survives_reopen(tmp_path):
    path = str(tmp_path / "a.duckdb")
    with duckdb.connect(path) as c:
        fill(AuditLog(c), 3)
    with duckdb.connect(path) as c:
        log = AuditLog(c)
        log.append(AuditKind.NOTE, "planner", "after-reopen", {})
        assert log.verify().ok and log.count() == 4
