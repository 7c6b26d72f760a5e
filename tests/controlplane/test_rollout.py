"""Rollout against a real server and real attached agents: canary, fleet, refusal, the live
quality guard aborting a canary, and operator rollback on every agent."""
import threading
import time

import pytest

from headroom_sidecar.controlplane.plans import ApplicationState
from headroom_sidecar.proto.plan import Plan, Precision, SkipLayers, WeightPrecision
from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.controlplane.rollout import RolloutSettings
from tests.controlplane.loopkit import LiveAgent, audit_kinds, connected, start, wait_for

pytestmark = pytest.mark.timeout(90)


def _approved(control, fp: str, plan_id: str, transform) -> str:
    control.plans.add(Plan(plan_id, 1, fp, (transform,)).to_doc(), "test")
    control.plans.transition(plan_id, PlanStatus.TRIALLED, "test", "trial ran")
    control.plans.transition(plan_id, PlanStatus.APPROVED, "test", "policy approved")
    return plan_id


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("rollout"), canary_s=0.2)
    agents = [LiveAgent(server.address, f"agent-{c}") for c in "ab"]
    wait_for(lambda: all(connected(server, a.agent_id) for a in agents), what="agents")
    yield server, agents
    for a in agents:
        a.close()
    server.stop(grace_s=0.5)


def test_canary_then_fleet_then_operator_rollback(fleet):
    server, (a, b) = fleet
    control = server.state.control
    plan_id = _approved(control, a.fingerprint, "ro-int8", WeightPrecision({1: Precision.INT8}))
    before = a.logits()
    result = control.rollout.run(plan_id)
    assert result.status is PlanStatus.APPLIED and result.applied == ("agent-a", "agent-b")
    apps = [(x.agent_id, x.stage.value, x.state.value) for x in control.plans.applications(plan_id)]
    assert apps == [("agent-a", "canary", "requested"), ("agent-a", "canary", "applied"),
                    ("agent-b", "fleet", "requested"), ("agent-b", "fleet", "applied")]
    assert not a.logits().equal(before) and not b.logits().equal(before)

    done = control.loop.rollback(plan_id, "carol", "test rollback")
    assert done.status is PlanStatus.ROLLED_BACK and set(done.applied) == {"agent-a", "agent-b"}
    assert a.logits().equal(before) and b.logits().equal(before)
    assert control.rollout.running_on(plan_id) == {}
    assert audit_kinds(control, plan_id) == [
        "APPLY_REQUESTED", "APPLIED", "APPLY_REQUESTED", "APPLIED", "ROLLBACK_REQUESTED",
        "ROLLED_BACK", "ROLLED_BACK"]
    assert control.audit.verify().ok


def test_refused_canary_stops_the_rollout(fleet):
    server, (a, b) = fleet
    control = server.state.control
    plan_id = _approved(control, a.fingerprint, "ro-bad", SkipLayers((7,)))   # 3-layer model
    result = control.rollout.run(plan_id)
    assert result.status is PlanStatus.FAILED and result.failed == ("agent-a",)
    apps = control.plans.applications(plan_id)
    assert [x.state for x in apps] == [ApplicationState.REQUESTED, ApplicationState.REFUSED]
    assert "out of range" in apps[-1].detail and all(x.agent_id == "agent-a" for x in apps)
    assert audit_kinds(control, plan_id) == ["APPLY_REQUESTED", "APPLY_FAILED"]
    assert control.plans.get(plan_id).status is PlanStatus.FAILED


def test_canary_period_ends_after_n_requests(fleet):
    server, (a, b) = fleet
    control = server.state.control
    control.rollout.settings = RolloutSettings(canary_s=30, canary_requests=2, poll_s=0.05)
    try:
        plan_id = _approved(control, a.fingerprint, "ro-count", WeightPrecision({0: Precision.INT8}))
        server_thread = threading.Timer(0.5, lambda: (a.serve(2), a.handle.exporter.flush(5_000)))
        server_thread.start()
        t0 = time.monotonic()
        result = control.rollout.run(plan_id)
        assert result.status is PlanStatus.APPLIED and time.monotonic() - t0 < 20
    finally:
        control.rollout.settings = RolloutSettings(canary_s=0.2, poll_s=0.05)
    control.loop.rollback(plan_id, "carol", "cleanup")


def test_quality_guard_on_the_canary_aborts_the_rollout(tmp_path):
    server = start(tmp_path, canary_s=20)
    guarded = LiveAgent(server.address, "agent-g", guard_every_n_requests=1, guard_min_top1=1.0)
    other = LiveAgent(server.address, "agent-h")
    try:
        wait_for(lambda: connected(server, "agent-g") and connected(server, "agent-h"),
                 what="agents")
        control = server.state.control
        plan_id = _approved(control, guarded.fingerprint, "ro-guard", SkipLayers((1,)))
        # Requests served by the canary while it is watched: the guard re-checks them.
        feeder = threading.Timer(0.5, lambda: guarded.serve(2))
        feeder.start()
        t0 = time.monotonic()
        result = control.rollout.run(plan_id)
        feeder.join()
        assert result.status is PlanStatus.ROLLED_BACK and time.monotonic() - t0 < 15
        assert "quality_guard" in result.message
        assert [x.agent_id for x in control.plans.applications(plan_id)] == ["agent-g"] * 3
        rows = control.audit.rows(subject=plan_id, limit=100, newest_first=False)
        assert [r.kind.value for r in rows] == ["APPLY_REQUESTED", "APPLIED", "ROLLED_BACK"]
        assert rows[-1].details["cause"] == "quality_guard" and rows[-1].actor == "agent:agent-g"
        assert rows[-1].details["detail"]["top1"] < 1.0
        assert control.plans.get(plan_id).status is PlanStatus.ROLLED_BACK
    finally:
        guarded.close()
        other.close()
        server.stop(grace_s=0.5)
