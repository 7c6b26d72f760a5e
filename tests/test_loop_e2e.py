"""The whole loop over a real gRPC server and DuckDB file, with a real agent on a tiny Llama:
traced requests -> TriggerPlan (Admin RPC) -> trials -> policy decision -> canary apply ->
operator rollback -> outputs bitwise identical to the unoptimised model -> audit verifies."""

import pytest

from headroom_sidecar.proto.client import AdminClient, reply_json
from tests.builders import tiny_llama
from tests.controlplane.loopkit import (LOOSE_BUDGET, LiveAgent, connected, start,
                                        token_eval_args, traced_rows, wait_for)

pytestmark = pytest.mark.timeout(120)


def _finished(client: AdminClient, job_id: str) -> dict:
    job = reply_json(client.get_job(job_id))
    return job if job["state"] != "running" else None


def test_closed_loop_end_to_end(tmp_path):
    server = start(tmp_path, canary_s=0.2)
    agent = LiveAgent(server.address, "agent-e2e")
    reference = tiny_llama(seed=0)      # the same weights, never touched by any plan
    try:
        wait_for(lambda: connected(server, "agent-e2e"), what="agent connected")
        agent.serve(4)
        agent.handle.exporter.flush(5_000)
        wait_for(lambda: traced_rows(server, "agent-e2e") >= 4, what="traces stored")
        unoptimised = agent.logits()
        assert unoptimised.equal(reference(agent_input()).logits)

        with AdminClient(server.address, actor="alice") as client:
            job = reply_json(client.trigger_plan(agent_id="agent-e2e", max_trials=2,
                                                 budget=LOOSE_BUDGET, eval=token_eval_args()))
            assert job["state"] == "running" and job["fingerprint"] == agent.fingerprint
            job = wait_for(lambda: _finished(client, job["job_id"]), 60, "planning job")
            assert job["state"] == "done", job["message"]
            assert job["decision"] == "approve" and job["plan_status"] == "applied"
            plan_id = job["plan_id"]
            # The job's other hypotheses: kept ones superseded by the best, the rest rejected.
            others = {p["plan_id"]: p["status"] for p in reply_json(client.list_plans(
                fingerprint=agent.fingerprint)) if p["plan_id"] != plan_id}
            assert len(others) == 1 and set(others.values()) <= {"superseded", "rejected"}, others

            shown = reply_json(client.show_plan(plan_id))
            _check_decision(shown)
            assert [(a["agent_id"], a["stage"], a["state"]) for a in shown["applications"]] == \
                [("agent-e2e", "canary", "requested"), ("agent-e2e", "canary", "applied")]
            assert shown["diff"][0].startswith("scope: structural")
            assert shown["running_on"] == {"agent-e2e": "canary"}
            assert not agent.logits().equal(unoptimised)      # the plan changed the model

            result = reply_json(client.rollback_plan(plan_id, "e2e check"))
            assert result["status"] == "rolled_back" and result["applied"] == ["agent-e2e"]
            assert agent.logits().equal(unoptimised)           # bitwise, not approximately

            verify = reply_json(client.verify_audit())
            assert verify["ok"] and verify["rows_checked"] == verify["head"]["seq"] > 0
            rows = reply_json(client.list_audit(subject=plan_id, oldest_first=True, limit=1000))
        assert [r["kind"] for r in rows] == [
            "PROPOSED", "TRIAL_REQUESTED", "TRIAL_RESULT", "POLICY_EVALUATED", "APPROVED",
            "APPLY_REQUESTED", "APPLIED", "ROLLBACK_REQUESTED", "ROLLED_BACK"]
        assert rows[-2]["actor"] == "operator:alice" and rows[-2]["details"]["reason"] == "e2e check"
        assert rows[-1]["actor"] == "agent:agent-e2e"
        assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    finally:
        agent.close()
        server.stop(grace_s=0.5)


def agent_input():
    from tests.builders import token_ids
    return token_ids(16, seed=99)


def _check_decision(shown: dict) -> None:
    (decision,) = shown["decisions"]
    assert decision["outcome"] == "approve" and decision["actor"] == "policy-engine"
    assert decision["policy_hash"] and decision["policy_revision"]
    by_id = {r["rule_id"]: r for r in decision["rules"]}
    assert set(by_id) == {"quality.top1", "structure.layers-cap", "process.rate-limit"}
    top1 = by_id["quality.top1"]
    assert top1["outcome"] == "pass" and top1["threshold"] == {"min": 0.0}
    assert top1["measured"] == shown["trials"][-1]["evidence"]["top1_agreement"] or any(
        t["evidence"] and t["evidence"]["top1_agreement"] == top1["measured"] for t in shown["trials"])
    assert by_id["process.rate-limit"]["measured"] == 0
    assert all(r["file"].endswith("loop.yaml") and r["line"] > 0 for r in decision["rules"])
