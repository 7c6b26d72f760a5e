"""Crash recovery of the control plane's jobs and rollouts.

A job running when the process died is `interrupted` after the restart (plan.status answers it
by its old id); a plan left `applying` is settled from what its agents say they run when they
reconnect (AgentHello.active_plan_id / active_plan_hash). In-process restarts over the same
DuckDB file with real agents' exporters for the rules; a real SIGKILL of a control plane
child process in the middle of a real rollout to a tiny Llama for the whole path.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import grpc
import pytest

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.exporter import BatchExporter
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.proto.client import AdminClient, reply_json
from headroom_sidecar.controlplane.jobs import Job, JobState, Stage
from headroom_sidecar.controlplane.loop import LoopSettings
from headroom_sidecar.controlplane.plans import ApplicationState, RolloutStage
from headroom_sidecar.proto.plan import Plan, Precision, WeightPrecision
from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.controlplane.recovery import RESTART_REASON
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from tests.controlplane.cpprocess import ControlPlaneProcess
from tests.controlplane.loopkit import LiveAgent, control_settings, wait_for, write_policies

pytestmark = pytest.mark.timeout(180)

FP = "ab" * 32
PLAN, OLD = "plan-new", "plan-old"


# ------------------------------------------------------------------ builders
def _start(tmp_path: Path, reconcile_timeout_s: float = 60.0):
    settings = control_settings(write_policies(tmp_path / "policies"))
    settings = dataclasses.replace(settings, loop=LoopSettings(
        trial_timeout_s=60.0, reconcile_timeout_s=reconcile_timeout_s))
    return start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0), settings)


def _add(control, plan_id: str, layer: int, to: tuple[PlanStatus, ...]) -> str:
    doc = Plan(plan_id, 1, FP, (WeightPrecision({layer: Precision.INT8}),)).to_doc()
    control.plans.add(doc, "test")
    for status in (PlanStatus.TRIALLED, *to):
        control.plans.transition(plan_id, status, "test", "seeded")
    return control.plans.get(plan_id).sha256


def _seed(tmp_path: Path, apps: list[tuple[str, str, str]]) -> str:
    """A database as a process killed mid-rollout leaves it: an older plan applied, PLAN
    applying with these (agent, stage, state) application records, its job running.
    Returns PLAN's sha256."""
    server = _start(tmp_path)
    control = server.state.control
    _add(control, OLD, 0, (PlanStatus.APPROVED, PlanStatus.APPLYING, PlanStatus.APPLIED))
    sha = _add(control, PLAN, 1, (PlanStatus.APPROVED, PlanStatus.APPLYING))
    for agent_id, stage, state in apps:
        control.plans.record_application(PLAN, agent_id, RolloutStage(stage),
                                         ApplicationState(state))
    control.loop.jobstore.save(Job("job-seeded", "rollout", FP, "", "", "operator:test",
                                   stage=Stage.ROLLING_OUT, plan_id=PLAN, trials=2))
    server.stop(grace_s=0)
    return sha


def _agent(address: str, agent_id: str, active: Optional[tuple[str, str]],
           classes: tuple = ()) -> BatchExporter:
    """A real agent's exporter that runs `active` (plan_id, sha256) and `classes` ((class,
    plan_id, sha256), ...) as far as its hello says."""
    settings = AgentSettings(flush_interval_ms=50, backoff_initial_ms=20, backoff_max_ms=200,
                             shutdown_timeout_ms=2000)
    hello = wire.make_hello(agent_id, None, "unavailable: test", settings)
    return BatchExporter(settings, hello, address, active_plan=lambda: active,
                         class_plans=lambda: list(classes))


def _status(control, plan_id: str = PLAN) -> PlanStatus:
    return control.plans.get(plan_id).status


def _latest(control, agent_id: str) -> str:
    return [a.state.value for a in control.plans.applications(PLAN) if a.agent_id == agent_id][-1]


def _settled(server, *agents: tuple) -> PlanStatus:
    """agents: (agent_id, active) or (agent_id, active, classes), as _agent takes them."""
    exporters = [_agent(server.address, *agent) for agent in agents]
    try:
        wait_for(lambda: _status(server.state.control) is not PlanStatus.APPLYING,
                 what="the plan to leave applying")
    finally:
        for ex in exporters:
            ex.shutdown(2000)
    return _status(server.state.control)


# ------------------------------------------------------------------ jobs
def test_running_job_is_interrupted_at_restart_and_plan_status_answers_its_old_id(tmp_path):
    _seed(tmp_path, [])                      # sent to nobody: fails at once
    server = _start(tmp_path)
    try:
        with AdminClient(server.address, actor="test") as admin:
            job = reply_json(admin.get_job("job-seeded"))
            listed = reply_json(admin.list_jobs())
        control = server.state.control
        plan_note = control.audit.rows(kind="NOTE", subject=PLAN)[0].details
        job_note = control.audit.rows(kind="NOTE", subject="job-seeded")[0].details
    finally:
        server.stop(grace_s=0.5)
    assert job["state"] == JobState.INTERRUPTED.value and job["stage"] == "rolling_out"
    assert "control plane restarted while this job was rolling_out (2 trial(s) done)" \
        == job["last_error"] and job["finished_at_s"] is not None
    assert job["plan_status"] == "failed" and [j["job_id"] for j in listed] == ["job-seeded"]
    assert job_note["event"] == "job_interrupted" and job_note["plan_id"] == PLAN
    assert plan_note == {"event": "rollout_reconciled", "status": "failed",
                         "reason": f"{RESTART_REASON}; it had been sent to no agent"}


def test_finished_jobs_are_not_touched_by_a_restart(tmp_path):
    server = _start(tmp_path)
    done = Job("job-done", "plan", FP, "agent-a", "", "planner", state=JobState.DONE,
               stage=Stage.FINISHED, started_at_s=1_700_000_000.25,   # whole µs: stored as is
               finished_at_s=1_700_000_001.5, message="fine")
    server.state.control.loop.jobstore.save(done)
    server.stop(grace_s=0)
    server = _start(tmp_path)
    try:
        again = server.state.control.loop.job("job-done")
        notes = server.state.control.audit.rows(kind="NOTE")
    finally:
        server.stop(grace_s=0.5)
    assert again.to_dict() == done.to_dict() and notes == []


def test_a_job_that_ended_keeps_its_end_across_a_restart(tmp_path):
    """Written as it ends, so a restart finds it failed (with why), not running/interrupted."""
    server = _start(tmp_path)
    control = server.state.control
    _add(control, PLAN, 1, (PlanStatus.NEEDS_HUMAN,))
    job_id = control.loop.approve(PLAN, "carol", "go").job_id     # no agent runs the model
    ended = control.loop.wait(job_id, timeout_s=30).to_dict()
    server.stop(grace_s=0)
    server = _start(tmp_path)
    try:
        with AdminClient(server.address, actor="test") as admin:
            again = reply_json(admin.get_job(job_id))
    finally:
        server.stop(grace_s=0.5)
    assert ended["state"] == "failed" and "no connected agent runs model" in ended["last_error"]
    assert {k: again[k] for k in ("state", "stage", "plan_id", "plan_status", "last_error")} == \
        {"state": "failed", "stage": "finished", "plan_id": PLAN, "plan_status": "approved",
         "last_error": ended["last_error"]}


# ------------------------------------------------------------------ the canary settles the plan
@pytest.mark.parametrize("recorded, runs, plan_status, app_state", [
    ("requested", True, PlanStatus.APPLIED, "applied"),        # its answer was lost in the kill
    ("requested", False, PlanStatus.FAILED, "failed"),         # never got it
    ("applied", True, PlanStatus.APPLIED, "applied"),          # killed during the canary watch
    ("applied", False, PlanStatus.ROLLED_BACK, "rolled_back"),  # ran it, does not any more
    ("requested", "other-hash", PlanStatus.FAILED, "failed"),  # same id, another document
])
def test_canary_hello_settles_the_plan(tmp_path, recorded, runs, plan_status, app_state):
    sha = _seed(tmp_path, [("agent-a", "canary", "requested")]
                + ([("agent-a", "canary", "applied")] if recorded == "applied" else []))
    active = None if runs is False else (PLAN, sha if runs is True else "0" * 64)
    server = _start(tmp_path)
    try:
        control = server.state.control
        assert control.loop.recovery.pending() == [PLAN]
        assert _settled(server, ("agent-a", active)) is plan_status
        apps = len(control.plans.applications(PLAN))
        old = _status(control, OLD)
        history = control.plans.history(PLAN).transitions[-1]
        job = control.loop.job("job-seeded")
        kinds = [r.kind.value for r in control.audit.rows(subject=PLAN, newest_first=False)]
        assert control.audit.verify().ok
        assert _latest(control, "agent-a") == app_state
    finally:
        server.stop(grace_s=0.5)
    confirmed = recorded == "applied" and runs is True     # nothing new to record for the agent
    assert apps == (2 if recorded == "applied" else 1) + (0 if confirmed else 1)
    assert (history.actor, history.to_status) == ("recovery", plan_status)
    assert history.reason.startswith(f"{RESTART_REASON}; canary agent-a: the agent reports it runs")
    assert old is (PlanStatus.SUPERSEDED if plan_status is PlanStatus.APPLIED else PlanStatus.APPLIED)
    assert job.state is JobState.INTERRUPTED and job.plan_status == plan_status.value
    agent_kind = {"applied": "APPLIED", "failed": "APPLY_FAILED", "rolled_back": "ROLLED_BACK"}
    assert kinds == ([] if confirmed else [agent_kind[app_state]]) + ["NOTE"]


@pytest.mark.parametrize("same_hash, plan_status", [(True, PlanStatus.APPLIED),
                                                     (False, PlanStatus.FAILED)])
def test_a_class_plan_is_settled_from_the_class_plans_in_the_hello(tmp_path, same_hash,
                                                                     plan_status):
    sha = _seed(tmp_path, [("agent-a", "canary", "requested")])
    server = _start(tmp_path)
    try:
        classes = (("grounded", PLAN, sha if same_hash else "0" * 64),)
        assert _settled(server, ("agent-a", (OLD, "ab" * 32), classes)) is plan_status
        reason = server.state.control.plans.history(PLAN).transitions[-1].reason
    finally:
        server.stop(grace_s=0.5)
    assert reason.endswith(f"the agent reports it runs {OLD} by default; for query classes: "
                           f"grounded: {PLAN}")


def test_fleet_agent_settles_only_itself_and_the_canary_settles_the_plan(tmp_path):
    sha = _seed(tmp_path, [("agent-a", "canary", "requested"), ("agent-a", "canary", "applied"),
                           ("agent-b", "fleet", "requested")])
    server = _start(tmp_path)
    try:
        control = server.state.control
        b = _agent(server.address, "agent-b", (PLAN, sha))
        wait_for(lambda: _latest(control, "agent-b") == "applied", what="agent-b settled")
        assert _status(control) is PlanStatus.APPLYING        # the canary has not spoken
        b.shutdown(2000)
        assert _settled(server, ("agent-a", (PLAN, sha))) is PlanStatus.APPLIED
        assert control.plans.history(PLAN).transitions[-1].reason.startswith(
            f"{RESTART_REASON}; canary agent-a:")             # settled by the canary, not b
        assert _latest(control, "agent-a") == "applied" and _latest(control, "agent-b") == "applied"
        b_again = _agent(server.address, "agent-b", None)     # settled once: a later hello is not
        wait_for(lambda: "agent-b" in server.state.connected_agents(), what="agent-b again")
        b_again.shutdown(2000)
        assert _latest(control, "agent-b") == "applied"
    finally:
        server.stop(grace_s=0.5)


def test_a_canary_that_never_reconnects_fails_the_plan_after_the_timeout(tmp_path):
    _seed(tmp_path, [("agent-a", "canary", "requested")])
    server = _start(tmp_path, reconcile_timeout_s=0.5)
    try:
        control = server.state.control
        assert _status(control) is PlanStatus.APPLYING
        wait_for(lambda: _status(control) is not PlanStatus.APPLYING, timeout_s=10, what="timeout")
        reason = control.plans.history(PLAN).transitions[-1].reason
        assert control.loop.recovery.pending() == []
    finally:
        server.stop(grace_s=0.5)
    assert _status_of(tmp_path) is PlanStatus.FAILED
    assert reason == f"{RESTART_REASON}; canary agent-a did not reconnect within 0.5 s"


def _status_of(tmp_path: Path) -> PlanStatus:
    server = _start(tmp_path)
    try:
        return _status(server.state.control)
    finally:
        server.stop(grace_s=0.5)


# ------------------------------------------------------------------ SIGKILL mid-rollout
def _seed_needs_human(tmp_path: Path, fingerprint: str, plan_ids: list[str]) -> None:
    server = _start(tmp_path)
    for layer, plan_id in enumerate(plan_ids):
        doc = Plan(plan_id, 1, fingerprint, (WeightPrecision({layer: Precision.INT8}),))
        server.state.control.plans.add(doc.to_doc(), "test")
        for status in (PlanStatus.TRIALLED, PlanStatus.NEEDS_HUMAN):
            server.state.control.plans.transition(plan_id, status, "test", "seeded")
    server.stop(grace_s=0)


def _approve_and_kill_in_the_canary_watch(cp: ControlPlaneProcess, plan_id: str) -> str:
    with AdminClient(cp.address, actor="carol") as admin:
        job_id = admin.approve_plan(plan_id, "go").job_id
        wait_for(lambda: [(a.stage, a.state) for a in admin.show_plan(plan_id).applications][-1:]
                 == [("canary", "applied")],
            timeout_s=60, what="the canary to apply")
        assert admin.show_plan(plan_id).plan.status == "applying"
    cp.kill9()
    return job_id


def _after_restart(cp: ControlPlaneProcess, plan_id: str, job_id: str) -> tuple[dict, dict, list]:
    time.sleep(0.5)
    assert cp.proc.poll() is None, f"exit {cp.proc.returncode}: {cp.log_tail()}"
    try:
        with AdminClient(cp.address, actor="carol") as admin:
            wait_for(lambda: admin.show_plan(plan_id).plan.status != "applying", timeout_s=60,
                     what="the plan to be settled")
            return (reply_json(admin.show_plan(plan_id)), reply_json(admin.get_job(job_id)),
                    reply_json(admin.list_audit(subject=plan_id, kind="NOTE")))
    except grpc.RpcError as e:   # say what the restarted process did, not only the refusal
        raise AssertionError(f"{e.code().name} {e.details()}; process exit "
                             f"{cp.proc.poll()}; its log:\n{cp.log_tail()}") from e


def test_sigkill_mid_rollout_then_restart_settles_the_plan_from_the_agent(tmp_path):
    from headroom_sidecar.agent.adapters import resolve_structure
    from headroom_sidecar.agent.fingerprint import model_info
    from tests.builders import tiny_llama
    model = tiny_llama(seed=0)                              # LiveAgent's model, seed 0
    _seed_needs_human(tmp_path, model_info(model, resolve_structure(model)).fingerprint,
                      ["kill-kept", "kill-dropped"])
    env = {"HEADROOM_POLICIES": str(tmp_path / "policies"), "HEADROOM_ROLLOUT_CANARY_S": "300",
           "HEADROOM_ROLLOUT_POLL_S": "0.05", "HEADROOM_LOOP_RECONCILE_TIMEOUT_S": "120"}
    cp = ControlPlaneProcess(tmp_path / "cp.duckdb", env=env)
    keys = [str(p) for p in tmp_path.glob("*.pub")]
    agent = LiveAgent(cp.address, "agent-k", backoff_max_ms=300,
                      **({"plan_verify_keys": keys[0]} if keys else {}))
    try:
        wait_for(lambda: agent.handle.exporter.counters().connected, what="agent connected")
        # 1. killed while watching the canary, which keeps running the plan -> applied
        job_id = _approve_and_kill_in_the_canary_watch(cp, "kill-kept")
        cp.start()
        shown, job, notes = _after_restart(cp, "kill-kept", job_id)
        assert shown["plan"]["status"] == "applied", shown["history"][-1]
        assert (job["state"], job["plan_status"]) == ("interrupted", "applied")
        assert notes[0]["details"]["event"] == "rollout_reconciled"
        # 2. killed again; the canary drops the plan while the control plane is down -> rolled_back
        job_id = _approve_and_kill_in_the_canary_watch(cp, "kill-dropped")
        agent.handle.rollback("the operator of this process rolled it back")
        cp.start()
        shown, job, notes = _after_restart(cp, "kill-dropped", job_id)
        assert shown["plan"]["status"] == "rolled_back", shown["history"][-1]
        assert shown["history"][-1]["reason"].startswith(RESTART_REASON)
        assert (job["state"], job["plan_status"]) == ("interrupted", "rolled_back")
        with AdminClient(cp.address) as admin:
            assert admin.verify_audit().ok
    finally:
        agent.close()
        cp.stop()
