"""Forgeries of the audit log by someone who can write the DuckDB file but not read the key:
each one is reproduced on a real file and verify names it; the honest log verifies."""
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import stat

import duckdb
import pytest

from headroom_sidecar.controlplane import cli
from headroom_sidecar.controlplane.audit import GENESIS_HASH, AuditHead, AuditLog, row_hash
from headroom_sidecar.proto.contract import AuditKind
from headroom_sidecar.controlplane.audit_key import ANCHOR_SUFFIX, KEY_SUFFIX, AuditSettings
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings

_OLD_SCHEMA = """
CREATE TABLE audit_log (seq BIGINT PRIMARY KEY, ts_us BIGINT NOT NULL, kind VARCHAR NOT NULL,
    actor VARCHAR NOT NULL, subject VARCHAR NOT NULL, details_json VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL, row_hash VARCHAR NOT NULL);
CREATE TABLE audit_head (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, row_hash VARCHAR NOT NULL);
"""


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "cp.duckdb")


@pytest.fixture
def con(db):
    c = duckdb.connect(db)
    yield c
    c.close()


@pytest.fixture
def log(con):
    return AuditLog(con)


def fill(log: AuditLog, n: int = 6) -> None:
    for i in range(n):
        log.append(AuditKind.POLICY_EVALUATED, "policy-engine", f"plan-{i}", {"i": i})


def rehash_from(con, first_seq: int, edit=lambda r: r) -> None:
    """What an attacker without the key can do: rewrite the hash chain and the head."""
    rows = con.execute("SELECT seq, ts_us, kind, actor, subject, details_json FROM audit_log "
                       "ORDER BY seq").fetchall()
    prev = GENESIS_HASH
    for seq, ts_us, kind, actor, subject, details_json in rows:
        if seq >= first_seq:
            kind, actor, subject, details_json = edit((kind, actor, subject, details_json)) \
                if seq == first_seq else (kind, actor, subject, details_json)
        h = row_hash(prev, seq, ts_us, kind, actor, subject, json.loads(details_json))
        con.execute("UPDATE audit_log SET kind = ?, actor = ?, subject = ?, details_json = ?, "
                    "prev_hash = ?, row_hash = ? WHERE seq = ?",
                    [kind, actor, subject, details_json, prev, h, seq])
        prev = h
    con.execute("UPDATE audit_head SET seq = ?, row_hash = ?",
                [rows[-1][0] if rows else 0, prev])


def copy_anchor(db: str, to: str) -> str:
    with open(db + ANCHOR_SUFFIX) as f, open(to, "w") as g:
        g.write(f.read())
    return to


# ---------------------------------------------------------------------- the honest log
def test_honest_log_verifies_against_its_own_and_a_copied_anchor(db, log, tmp_path):
    fill(log, 6)
    assert log.verify() == log.verify(anchor=log.head())
    result = log.verify()
    assert (result.ok, result.rows_checked, result.unkeyed_before_seq) == (True, 6, None)
    anchor = json.loads(open(db + ANCHOR_SUFFIX).read())
    assert AuditHead.from_dict(anchor) == log.head() and log.head().keyed_since == 1


def test_key_file_is_created_0600_and_the_head_goes_to_the_log(db, con, caplog):
    with caplog.at_level(logging.INFO, logger="headroom_sidecar.controlplane.audit.anchor"):
        log = AuditLog(con)
        log.append(AuditKind.NOTE, "planner", "x", {})
    assert stat.S_IMODE(os.stat(db + KEY_SUFFIX).st_mode) == 0o600
    assert len(bytes.fromhex(open(db + KEY_SUFFIX).read().strip())) == 32
    shipped = [r.getMessage() for r in caplog.records if r.name == "headroom_sidecar.controlplane.audit.anchor"]
    assert shipped == [f"audit head {json.dumps(dataclasses.asdict(log.head()), sort_keys=True)}"]


def test_key_and_anchor_files_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADROOM_AUDIT_KEY_FILE", str(tmp_path / "secrets" / "k"))
    s = AuditSettings.resolve(str(tmp_path / "x.duckdb"))
    assert (s.key_file, s.anchor_file) == (str(tmp_path / "secrets" / "k"),
                                          str(tmp_path / "x.duckdb") + ANCHOR_SUFFIX)


# ---------------------------------------------------------------------- the forgeries
def test_truncated_tail_with_the_head_rewritten(db, con, log):
    fill(log, 6)
    con.execute("DELETE FROM audit_log WHERE seq > 4")
    con.execute("UPDATE audit_head SET seq = 4, row_hash = (SELECT row_hash FROM audit_log "
                "WHERE seq = 4), mac = (SELECT mac FROM audit_log WHERE seq = 4)")
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert result.reason == "anchor names row 6 but the log ends at row 4 (rows removed from the tail)"


def test_truncation_that_also_rewrites_the_local_anchor_is_caught_by_a_copied_one(db, con, log,
                                                                                   tmp_path):
    fill(log, 6)
    shipped = AuditHead.from_dict(json.loads(open(copy_anchor(db, str(tmp_path / "a")),
                                                  ).read()))
    con.execute("DELETE FROM audit_log WHERE seq > 4")
    four = con.execute("SELECT row_hash, mac FROM audit_log WHERE seq = 4").fetchone()
    con.execute("UPDATE audit_head SET seq = 4, row_hash = ?, mac = ?", list(four))
    with open(db + ANCHOR_SUFFIX, "w") as f:
        json.dump({"seq": 4, "row_hash": four[0], "mac": four[1], "keyed_since": 1}, f)
    assert log.verify().ok   # everything the attacker could reach agrees
    result = log.verify(anchor=shipped)
    assert (result.ok, result.first_bad_seq) == (False, 5) and "removed from the tail" in result.reason


def test_wiped_log(db, con, log):
    fill(log, 3)
    con.execute("DELETE FROM audit_log")
    con.execute("DELETE FROM audit_head")
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert result.reason == "anchor names row 3 but the log is empty (wiped)"


def test_edited_row_with_the_chain_recomputed(con, log):
    fill(log, 6)
    rehash_from(con, 3, lambda r: ("APPROVED", "operator:mallory", r[2], r[3]))
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert result.reason.startswith("row 3's MAC does not match")


@pytest.mark.parametrize("mac, words", [
    (None, "row 7 has no MAC, but rows from 1 on are keyed"),
    ("guess", "row 7's MAC does not match"),
])
def test_forged_appended_approval(con, log, mac, words):
    fill(log, 6)
    last = con.execute("SELECT row_hash, mac FROM audit_log WHERE seq = 6").fetchone()
    details = {"reason": "looks fine"}
    h = row_hash(last[0], 7, 1, "APPROVED", "operator:mallory", "plan-x", details)
    if mac == "guess":   # a MAC under some other key: the right shape, the wrong value
        mac = hmac.new(b"not the key", (last[1] + h).encode(), hashlib.sha256).hexdigest()
    con.execute("INSERT INTO audit_log VALUES (7, 1, 'APPROVED', 'operator:mallory', 'plan-x', "
                "?, ?, ?, ?)", [json.dumps(details), last[0], h, mac])
    con.execute("UPDATE audit_head SET seq = 7, row_hash = ?, mac = ?", [h, mac])
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert result.reason.startswith(words)


def test_stripped_macs_with_the_chain_recomputed(db, con, log):
    fill(log, 4)
    con.execute("UPDATE audit_log SET mac = NULL")
    rehash_from(con, 2, lambda r: (r[0], "operator:mallory", r[2], r[3]))
    con.execute("UPDATE audit_head SET mac = NULL, keyed_since = NULL")
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert result.reason.startswith("row 1 has no MAC, but rows from 1 on are keyed by the anchor")


def test_a_different_key_fails_every_row(db, con, log, tmp_path):
    fill(log, 2)
    other = AuditLog(con, settings=AuditSettings(key_file=str(tmp_path / "other-key"),
                                                  anchor_file=str(tmp_path / "other-anchor")))
    result = other.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1) and "key file changed" in result.reason


# ---------------------------------------------------------------------- migration
def test_rows_from_before_the_key_are_reported_unkeyed(db):
    with duckdb.connect(db) as c:
        c.execute(_OLD_SCHEMA)
        prev = GENESIS_HASH
        for seq in (1, 2, 3):
            h = row_hash(prev, seq, seq, "NOTE", "planner", "old", {})
            c.execute("INSERT INTO audit_log VALUES (?, ?, 'NOTE', 'planner', 'old', '{}', ?, ?)",
                      [seq, seq, prev, h])
            prev = h
        c.execute("INSERT INTO audit_head VALUES (1, 3, ?)", [prev])
    with duckdb.connect(db) as c:
        log = AuditLog(c)
        before = log.verify()
        assert (before.ok, before.unkeyed_before_seq) == (True, 4)
        log.append(AuditKind.NOTE, "planner", "new", {})
        after = log.verify()
        assert (after.ok, after.rows_checked, after.unkeyed_before_seq) == (True, 4, 4)
        assert log.head().keyed_since == 4


# ---------------------------------------------------------------------- the CLI, end to end
def test_cli_verify_with_an_anchor_file(tmp_path, capsys):
    running = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0))
    try:
        audit = running.state.control.audit
        for i in range(3):
            audit.append(AuditKind.NOTE, "planner", f"s{i}", {})
        anchor = copy_anchor(running.store.db_path, str(tmp_path / "shipped-anchor"))
        argv = ["audit", "verify", "--address", running.address, "--anchor", anchor]
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["ok"]
        with running.store.transaction() as cur:   # the tail goes, the head is made to agree
            cur.execute("DELETE FROM audit_log WHERE seq = 3")
            cur.execute("UPDATE audit_head SET seq = 2, row_hash = (SELECT row_hash FROM "
                        "audit_log WHERE seq = 2), mac = (SELECT mac FROM audit_log WHERE seq = 2)")
        assert cli.main(argv) == 1
        out = json.loads(capsys.readouterr().out)
        assert (out["ok"], out["first_bad_seq"]) == (False, 3)
        assert "anchor names row 3" in out["reason"]
    finally:
        running.stop(grace_s=0.5)


@pytest.mark.parametrize("text, words", [("", "at least 32 hex digits"),
                                         ("zz" * 32, "at least 32 hex digits")])
def test_a_broken_key_file_is_refused_by_name(tmp_path, text, words):
    key = tmp_path / "k"
    key.write_text(text)
    key.chmod(0o600)
    with duckdb.connect(str(tmp_path / "x.duckdb")) as c, pytest.raises(OSError) as e:
        AuditLog(c, settings=AuditSettings(key_file=str(key), anchor_file=""))
    assert str(key) in str(e.value) and words in str(e.value)


def test_a_key_file_in_a_new_folder_is_created(tmp_path):
    key = tmp_path / "state" / "audit" / "key"
    with duckdb.connect(str(tmp_path / "x.duckdb")) as c:
        AuditLog(c, settings=AuditSettings(key_file=str(key))).append(AuditKind.NOTE, "planner", "s")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
