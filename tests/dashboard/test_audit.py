"""Audit log page: verification status of the hash chain, search, row details."""
import duckdb

from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.dashboard.helpers import no_exception, tables, texts
from tests.dashboard.kit import HISTORY_OPERATOR


def test_chain_verified_and_rows_listed(world, open_app):
    at = open_app(world.address, "audit")
    no_exception(at)
    with world.server.store.reader() as cur:
        head_seq = cur.execute("SELECT max(seq) FROM audit_log").fetchone()[0]
    assert "Chain verified" in texts(at)
    (rows,) = tables(at)
    assert rows["seq"].iloc[0] >= head_seq and list(rows["seq"]) == sorted(rows["seq"], reverse=True)


def test_search_by_kind_actor_and_text(world, open_app):
    at = open_app(world.address, "audit")
    at.selectbox(key="audit-kind").set_value("APPROVED").run()
    at.text_input(key="audit-actor").input(f"operator:{HISTORY_OPERATOR}").run()
    no_exception(at)
    (rows,) = tables(at)
    assert set(rows["kind"]) == {"APPROVED"} and set(rows["actor"]) == {f"operator:{HISTORY_OPERATOR}"}
    assert world.history_plan in set(rows["subject"])
    at.selectbox(key="audit-kind").set_value("(all)").run()
    at.text_input(key="audit-actor").input("").run()
    at.text_input(key="audit-text").input("latency regression").run()   # the rollback reason
    (rows,) = tables(at)
    # The operator's request carries the reason; the agent's answer echoes it in its detail.
    assert set(rows["kind"]) == {"ROLLBACK_REQUESTED", "ROLLED_BACK"}
    assert set(rows["subject"]) == {world.history_plan}
    at.text_input(key="audit-text").input("no such words anywhere").run()
    no_exception(at)
    assert not tables(at) and "No audit rows match this search" in texts(at)


def test_tampered_chain_shows_where_it_breaks(tmp_path, open_app):
    db = str(tmp_path / "cp.duckdb")
    server = start_server(ServerSettings(db_path=db, port=0))
    for i in range(3):
        server.state.control.audit.append("NOTE", "operator:test", f"s{i}", {"i": i})
    server.stop(grace_s=0.5)
    with duckdb.connect(db) as con:                  # someone edits row 2 behind the log's back
        con.execute("""UPDATE audit_log SET details_json = '{"i":99}' WHERE seq = 2""")
    server = start_server(ServerSettings(db_path=db, port=0))
    try:
        at = open_app(server.address, "audit")
        no_exception(at)
        assert "Chain broken at row 2" in texts(at)
        assert "row_hash does not match" in texts(at)
    finally:
        server.stop(grace_s=0.5)
