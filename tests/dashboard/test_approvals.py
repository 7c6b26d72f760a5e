"""Approvals page: needs_human plans approved or rejected with a reason, as the configured
operator, through the control plane (which records it in the audit log)."""
import pytest

from headroom_sidecar.proto.client import AdminClient, reply_json
from tests.dashboard.helpers import no_exception, tables, texts
from tests.controlplane.loopkit import wait_for
from tests.dashboard.kit import pending_plan


@pytest.fixture
def pending(world):
    plan_id = pending_plan(world.address)
    yield plan_id
    with AdminClient(world.address, actor="cleanup") as admin:
        def settled():
            status = admin.show_plan(plan_id).plan.status
            return status if status not in ("approved", "applying") else None
        if wait_for(settled, 30, "rollout") == "applied":
            admin.rollback_plan(plan_id, "test cleanup")


def _audit(world, plan_id: str, kind: str) -> list[dict]:
    with AdminClient(world.address) as admin:
        return reply_json(admin.list_audit(subject=plan_id, kind=kind))


def test_pending_plan_shows_why_a_human_is_asked(world, pending, open_app):
    at = open_app(world.address, "approvals", operator="dana")
    no_exception(at)
    assert pending in [s.value for s in at.subheader]
    assert "operator:dana" in texts(at)
    rules = next(t for t in tables(at) if "rule" in t.columns)
    assert list(rules["rule"]) == ["review.exact-match"]          # only what did not pass
    assert "review.exact-match" in texts(at)                       # the decision's reason


def test_approve_needs_a_reason_then_goes_through_the_control_plane(world, pending, open_app):
    at = open_app(world.address, "approvals", operator="dana")
    at.button(key=f"approve-{pending}").click().run()
    no_exception(at)
    assert "Give a reason" in texts(at)
    assert not _audit(world, pending, "APPROVED")
    at.text_area(key=f"reason-{pending}").input("evidence read, canary watched")
    at.button(key=f"approve-{pending}").click().run()
    no_exception(at)
    assert f"Approved {pending} as operator:dana" in texts(at)
    (row,) = _audit(world, pending, "APPROVED")
    assert row["actor"] == "operator:dana"
    assert row["details"] == {"reason": "evidence read, canary watched"}
    assert pending not in [s.value for s in at.subheader]          # no longer waits


def test_reject_records_operator_and_reason(world, pending, open_app):
    at = open_app(world.address, "approvals", operator="erin")
    at.text_area(key=f"reason-{pending}").input("too risky this week")
    at.button(key=f"reject-{pending}").click().run()
    no_exception(at)
    assert f"Rejected {pending} as operator:erin: status rejected" in texts(at)
    (row,) = _audit(world, pending, "REJECTED")
    assert (row["actor"], row["details"]["reason"]) == ("operator:erin", "too risky this week")


def test_without_identity_the_page_is_read_only(world, pending, open_app):
    at = open_app(world.address, "approvals", operator="")
    no_exception(at)
    assert pending in [s.value for s in at.subheader]
    assert "no operator identity" in texts(at)
    assert not [b for b in at.button if b.key and b.key.startswith(("approve-", "reject-"))]


def test_nothing_pending_says_where_plans_come_from(empty_server, open_app):
    at = open_app(empty_server.address, "approvals")
    no_exception(at)
    assert "Nothing waits for a human" in texts(at) and "needs_human" in texts(at)
