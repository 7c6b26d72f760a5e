"""`headroom-controlplane plan ...` / `audit ...` / `policy ...` against a real server."""
import json

import pytest

from headroom_sidecar.controlplane.cli import main
from headroom_sidecar.proto.plan import Plan, SkipLayers
from headroom_sidecar.proto.contract import PlanStatus
from tests.controlplane import helpers
from tests.controlplane.loopkit import LiveAgent, connected, start, traced_rows, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start(tmp_path_factory.mktemp("cli"))
    plans = running.state.control.plans
    for plan_id in ("cli-1", "cli-2"):
        plans.add(Plan(plan_id, 1, helpers.MODEL.fingerprint, (SkipLayers((1,)),)).to_doc(), "t")
        plans.transition(plan_id, PlanStatus.TRIALLED, "t", "trial")
        plans.transition(plan_id, PlanStatus.NEEDS_HUMAN, "policy-engine", "review")
    yield running
    running.stop(grace_s=0.5)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_show_reject(server, capsys, monkeypatch):
    monkeypatch.setenv("HEADROOM_ADDRESS", server.address)
    code, out, _ = _run(capsys, "plan", "list")
    assert code == 0 and [p["plan_id"] for p in json.loads(out)] == ["cli-2", "cli-1"]
    code, out, _ = _run(capsys, "plan", "show", "cli-1")
    shown = json.loads(out)   # no agent of this model registered: the diff says so
    assert code == 0 and shown["doc"]["plan_id"] == "cli-1" and "model facts unknown" in shown["diff"][0]
    monkeypatch.setenv("HEADROOM_OPERATOR", "erin")
    code, out, _ = _run(capsys, "plan", "reject", "cli-1", "--reason", "too risky")
    assert code == 0 and json.loads(out)["status"] == "rejected"
    (row,) = server.state.control.audit.rows(kind="REJECTED", subject="cli-1")
    assert row.actor == "operator:erin" and row.details == {"reason": "too risky"}


def test_actor_flag_wins_and_audit_commands(server, capsys, monkeypatch):
    monkeypatch.setenv("HEADROOM_OPERATOR", "erin")
    code, out, _ = _run(capsys, "plan", "reject", "cli-2", "--reason", "no", "--as", "frank",
                        "--address", server.address)
    assert code == 0
    assert server.state.control.audit.rows(kind="REJECTED", subject="cli-2")[0].actor == \
        "operator:frank"
    code, out, _ = _run(capsys, "audit", "verify", "--address", server.address)
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = _run(capsys, "audit", "list", "--subject", "cli-2", "--address", server.address)
    assert code == 0 and json.loads(out)[0]["kind"] == "REJECTED"


def test_errors_are_one_line_and_exit_2(server, capsys):
    code, _, err = _run(capsys, "plan", "show", "missing", "--address", server.address)
    assert code == 2 and err.strip() == "headroom-controlplane plan: error: NOT_FOUND: ShowPlan: no plan 'missing'"
    code, _, err = _run(capsys, "plan", "approve", "cli-1", "--reason", "x", "--as", "g",
                        "--address", server.address)
    assert code == 2 and "FAILED_PRECONDITION" in err and "cli-1 is rejected" in err


def test_trigger_arguments_reach_the_server(server, capsys):
    code, _, err = _run(capsys, "plan", "trigger", "--agent", "nobody", "--max-trials", "3",
                        "--address", server.address, "--as", "g")
    assert code == 2 and "no agent 'nobody' has ever connected" in err


def test_policy_commands_are_mounted(server, capsys, tmp_path):
    from tests.controlplane.loopkit import write_policies
    folder = write_policies(tmp_path / "p")
    code, out, _ = _run(capsys, "policy", "lint", folder)
    assert code == 0 and "ok" in out


def test_trigger_wait_reports_progress_and_returns_the_finished_job(server, capsys):
    agent = LiveAgent(server.address, "cli-wait")
    try:
        wait_for(lambda: connected(server, "cli-wait"), what="agent connected")
        agent.serve(2)
        agent.handle.exporter.flush(5_000)
        wait_for(lambda: traced_rows(server, "cli-wait") >= 2, what="traces stored")
        code, out, err = _run(capsys, "plan", "trigger", "--agent", "cli-wait", "--max-trials", "1",
                              "--wait", "--poll-s", "0.05", "--address", server.address, "--as", "g")
    finally:
        agent.close()
    job = json.loads(out)
    # The tiny model has no tokenizer for the default text eval: its one trial fails, the job
    # still finishes (done, no plan) and --wait returns it with the trial counted.
    assert code == 0 and job["state"] == "done" and job["trials"] == 1 and job["plan_id"] is None
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"job {job['job_id']}: planning, 0 trial(s) done")
    assert lines[-1].endswith("1 trial(s) done") and len(lines) == len(set(lines))
