"""Signed plans and evidence bound to the agent asked, against a real control plane on localhost
and a real attached tiny Llama (agent/verify.py, controlplane/signing.py, controlplane/trials.py).

Attacks reproduced: a plan with no signature / an empty sha256 / a document altered after
signing / a signature by a key the agent was not given / a trial's plan replayed as an
ApplyPlan; a rogue client answering a trial that was sent to another agent, answering twice,
or claiming a quality-guard breach for a plan it never received.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import threading

import pytest
import torch

from headroom_sidecar.agent.verify import parse_trusted_keys
from headroom_sidecar.proto.plan import Plan, SkipLayers
from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.controlplane.server import InboundKind
from headroom_sidecar.controlplane.signing import KEY_FILE_NAME, PlanSigner, SigningKeyError
from headroom_sidecar.controlplane.trials import DropReason, StatusState, plan_message
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.plandoc import PlanPurpose
from tests.controlplane import helpers
from tests.controlplane.loopkit import LiveAgent, audit_kinds, connected, start, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("signed"), canary_s=0.1)
    agent = LiveAgent(server.address, "agent-s", guard_every_n_requests=0)
    wait_for(lambda: connected(server, "agent-s"), what="agent connected")
    yield server, agent
    agent.close()
    server.stop(grace_s=0.5)


def _doc(fp: str, plan_id: str) -> dict:
    return Plan(plan_id, 1, fp, (SkipLayers((1,)),)).to_doc()


def _statuses(server, agent_id: str) -> list:
    got: list = []
    server.state.control.client.subscribe(lambda r: got.append(r) if r.agent_id == agent_id else None)
    return got


def _push_apply(server, agent, plan: pb.Plan) -> dict:
    """Sends a raw ApplyPlan and returns the agent's PlanStatus for it (unrequested: a
    subscriber sees it)."""
    got = _statuses(server, agent.agent_id)
    assert server.state.send_to_agent(agent.agent_id, pb.ControlMessage(apply_plan=plan))
    report = wait_for(lambda: got and got[-1], what="plan status")
    return {"state": report.state, "detail": report.detail_json or {}}


def _signed(server, doc: dict, purpose=PlanPurpose.APPLY) -> pb.Plan:
    return server.state.control.client.signer.sign(plan_message(doc), purpose)


# ------------------------------------------------------------------ the agent refuses
def _unsigned(server, doc):
    return plan_message(doc)


def _empty_sha(server, doc):
    p = plan_message(doc)
    p.sha256 = ""
    return server.state.control.client.signer.sign(p, PlanPurpose.APPLY)


def _altered_after_signing(server, doc):
    p = _signed(server, doc)
    p.document_json = p.document_json.replace('"layers":[1]', '"layers":[0]')
    return p


def _altered_and_rehashed(server, doc):
    import hashlib
    p = _altered_after_signing(server, doc)
    p.sha256 = hashlib.sha256(p.document_json.encode()).hexdigest()
    return p


def _untrusted_key(server, doc):
    return PlanSigner.generate().sign(plan_message(doc), PlanPurpose.APPLY)


def _trial_replayed(server, doc):
    return _signed(server, doc, PlanPurpose.TRIAL)


@pytest.mark.parametrize("attack, why", [
    (_unsigned, "unsigned"),
    (_empty_sha, "is not 64 lowercase hex digits"),
    (_altered_after_signing, "altered in transit"),
    (_altered_and_rehashed, "signature does not verify"),
    (_untrusted_key, "which this agent does not trust"),
    (_trial_replayed, "signature does not verify with key"),
])
def test_agent_refuses_plans_not_signed_by_a_trusted_key(world, attack, why):
    server, agent = world
    before = agent.logits()
    unverified = agent.handle.stats().control.unverified
    plan_id = f"evil-{attack.__name__.strip('_')}"
    got = _push_apply(server, agent, attack(server, _doc(agent.fingerprint, plan_id)))
    assert got["state"] is StatusState.REFUSED
    assert any(why in p for p in got["detail"]["problems"]), got["detail"]
    assert got["detail"]["origin"] == "control_plane"
    assert agent.handle.active_plan is None and torch.equal(agent.logits(), before)
    assert agent.handle.stats().control.unverified == unverified + 1


def test_unsigned_trial_is_refused_before_any_weight_moves(world):
    server, agent = world
    results: list = []
    server.state.on(InboundKind.TRIAL_RESULT, lambda a, m: results.append(m) if a == "agent-s" else None)
    trial = pb.TrialRequest(trial_id="raw-trial", plan=plan_message(_doc(agent.fingerprint, "t")),
                            eval_json="{}")
    assert server.state.send_to_agent("agent-s", pb.ControlMessage(trial=trial))
    got = wait_for(lambda: results and results[-1], what="trial result")
    assert got.trial_id == "raw-trial" and got.evidence_json == ""
    assert "unsigned" in got.error


def test_signed_apply_and_trial_are_accepted(world):
    server, agent = world
    client = server.state.control.client
    evidence = client.request("agent-s", _doc(agent.fingerprint, "good-trial"),
                              json.dumps({"token_sequences": [[1, 2, 3, 4, 5, 6]],
                                          "token_prompts": [[1, 2]], "new_tokens": 2,
                                          "latency_repeats": 1}), timeout_s=60)
    assert evidence["plan_id"] == "good-trial" and agent.handle.active_plan is None
    report = client.apply("agent-s", _doc(agent.fingerprint, "good-apply"), timeout_s=60)
    assert report.state is StatusState.APPLIED, report.detail
    assert report.detail_json["origin"] == "control_plane"
    assert report.detail_json["key_id"] == client.signer.key_id
    assert agent.handle.active_plan.plan_id == "good-apply"
    agent.handle.rollback("test over")
    assert agent.handle.active_plan is None


def test_agent_without_keys_refuses_everything(world, tmp_path):
    server, _ = world
    bare = LiveAgent(server.address, "agent-bare", plan_verify_keys="")
    try:
        wait_for(lambda: connected(server, "agent-bare"), what="bare agent")
        report = server.state.control.client.apply("agent-bare", _doc(bare.fingerprint, "nokey"), 60)
        assert report.state is StatusState.REFUSED
        assert "no plan verification key is configured" in report.detail
        assert bare.handle.active_plan is None
    finally:
        bare.close()


def test_key_rotation_trusts_the_listed_keys_only(world, tmp_path):
    server, _ = world
    old, new = server.state.control.client.signer, PlanSigner.generate()
    keys_file = tmp_path / "trusted.keys"
    keys_file.write_text(f"# rotation: old then new\n{old.public_b64}\n{new.public_b64}\n")
    both = parse_trusted_keys(str(keys_file))
    assert [k.key_id for k in both] == [old.key_id, new.key_id]
    rotated = LiveAgent(server.address, "agent-rot", plan_verify_keys=new.public_b64)
    try:
        wait_for(lambda: connected(server, "agent-rot"), what="rotated agent")
        doc = _doc(rotated.fingerprint, "rot")
        by_old = _push_apply(server, rotated, old.sign(plan_message(doc), PlanPurpose.APPLY))
        assert by_old["state"] is StatusState.REFUSED
        assert any(f"signed by key {old.key_id!r}" in p for p in by_old["detail"]["problems"])
        by_new = _push_apply(server, rotated, new.sign(plan_message(doc), PlanPurpose.APPLY))
        assert by_new["state"] is StatusState.APPLIED
        assert by_new["detail"]["key_id"] == new.key_id
    finally:
        rotated.close()


@pytest.mark.parametrize("spec, error", [
    ("not-base64!", "not base64"),
    (base64.b64encode(b"x" * 31).decode(), "decodes to 31 bytes"),
    ("/nonexistent/keys.pub", "no such file"),
])
def test_bad_verify_keys_are_clear_errors(spec, error):
    from headroom_sidecar.agent.settings import AgentSettings
    with pytest.raises(ValueError, match=f"plan_verify_keys: .*{error}"):
        AgentSettings(plan_verify_keys=spec)


def test_local_apply_needs_no_signature_and_is_audited(world):
    server, agent = world
    agent.handle.apply_plan(_doc(agent.fingerprint, "mine"))
    control = server.state.control
    try:
        wait_for(lambda: "NOTE" in audit_kinds(control, "mine"), what="local apply audited")
        note = [r for r in control.audit.rows(subject="mine", limit=10) if r.kind.value == "NOTE"][0]
        assert note.details["event"] == "local_apply" and note.actor == "agent:agent-s"
    finally:
        agent.handle.rollback("test over")


# ------------------------------------------------------------------ the key file
def test_key_file_is_made_0600_outside_the_database_and_reused(world, tmp_path):
    server, _ = world
    signer = server.state.control.client.signer
    assert signer.path.name == KEY_FILE_NAME and signer.path.suffix != ".duckdb"
    assert stat.S_IMODE(signer.path.stat().st_mode) == 0o600
    assert (signer.path.parent / f"{KEY_FILE_NAME}.pub").read_text().strip() == signer.public_b64
    again = PlanSigner.load_or_create(signer.path)
    assert again.key_id == signer.key_id


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "k.key"
    PlanSigner.load_or_create(path)
    os.chmod(path, 0o640)
    with pytest.raises(SigningKeyError, match="group or others"):
        PlanSigner.load_or_create(path)
    os.chmod(path, 0o600)
    assert PlanSigner.load_or_create(path).key_id


def test_signing_key_setting_names_the_file(tmp_path, monkeypatch):
    from headroom_sidecar.controlplane.signing import PlanSigner as S
    path = tmp_path / "elsewhere" / "cp.key"
    monkeypatch.setenv("HEADROOM_PLAN_SIGNING_KEY", str(path))
    signer = S.for_server(str(tmp_path / "db" / "cp.duckdb"))
    assert signer.path == path and path.exists() and not (tmp_path / "db" / KEY_FILE_NAME).exists()


# ------------------------------------------------------------------ evidence bound to the agent asked
def test_trial_evidence_only_from_the_agent_asked_once(world):
    server, agent = world
    client = server.state.control.client
    with helpers.AgentStream(server.address) as victim, helpers.AgentStream(server.address) as rogue:
        victim.send(helpers.hello("victim"))
        rogue.send(helpers.hello("rogue"))
        wait_for(lambda: connected(server, "victim") and connected(server, "rogue"), what="both")
        out: dict = {}
        asking = threading.Thread(target=lambda: out.update(ev=client.request(
            "victim", _doc(helpers.MODEL.fingerprint, "bound"), "{}", 30, trial_id="t-bound")))
        before = dict(client.dropped)
        asking.start()
        sent = victim.recv()
        assert sent.trial.trial_id == "t-bound" and sent.trial.plan.signature
        perfect = json.dumps({"top1_agreement": 1.0, "forged": True})
        rogue.send(pb.AgentMessage(trial_result=pb.TrialResult(trial_id="t-bound",
                                                               evidence_json=perfect)))
        rogue.send(pb.AgentMessage(trial_result=pb.TrialResult(trial_id="t-made-up",
                                                               evidence_json=perfect)))
        wait_for(lambda: client.dropped[DropReason.UNKNOWN_TRIAL] > before.get(
            DropReason.UNKNOWN_TRIAL, 0), what="made-up trial dropped")
        assert client.dropped[DropReason.WRONG_AGENT] == before.get(DropReason.WRONG_AGENT, 0) + 1
        assert asking.is_alive()                        # the forged answer did not end the wait
        victim.send(pb.AgentMessage(trial_result=pb.TrialResult(
            trial_id="t-bound", evidence_json=json.dumps({"top1_agreement": 0.5}))))
        asking.join(10)
        assert out["ev"] == {"top1_agreement": 0.5}
        victim.send(pb.AgentMessage(trial_result=pb.TrialResult(trial_id="t-bound",
                                                                evidence_json=perfect)))
        wait_for(lambda: client.dropped[DropReason.DUPLICATE] == before.get(
            DropReason.DUPLICATE, 0) + 1, what="second answer dropped")


def test_plan_status_only_from_the_agent_asked(world):
    server, _ = world
    client = server.state.control.client
    with helpers.AgentStream(server.address) as victim, helpers.AgentStream(server.address) as rogue:
        victim.send(helpers.hello("victim2"))
        rogue.send(helpers.hello("rogue2"))
        wait_for(lambda: connected(server, "victim2") and connected(server, "rogue2"), what="both")
        doc = _doc(helpers.MODEL.fingerprint, "bound-apply")
        out: dict = {}
        asking = threading.Thread(target=lambda: out.update(r=client.apply("victim2", doc, 30)))
        asking.start()
        sent = victim.recv().apply_plan
        assert sent.signature and sent.key_id == client.signer.key_id
        rogue.send(pb.AgentMessage(plan_status=pb.PlanStatus(
            plan_id="bound-apply", sha256=sent.sha256, state=pb.PlanStatus.APPLIED)))
        asking.join(0.5)
        assert asking.is_alive()
        victim.send(pb.AgentMessage(plan_status=pb.PlanStatus(      # applied something else
            plan_id="bound-apply", sha256="0" * 64, state=pb.PlanStatus.APPLIED)))
        asking.join(10)
        assert out["r"].state is StatusState.FAILED and "not the plan sent" in out["r"].detail


def test_rogue_quality_guard_claim_does_not_roll_the_fleet_back(world):
    server, agent = world
    control = server.state.control
    doc = _doc(agent.fingerprint, "fleet-plan")
    control.plans.add(doc, "test")
    control.plans.transition("fleet-plan", PlanStatus.TRIALLED, "test", "trial ran")
    control.plans.transition("fleet-plan", PlanStatus.APPROVED, "test", "policy approved")
    assert control.rollout.run("fleet-plan").status is PlanStatus.APPLIED
    dropped = control.rollout.dropped_statuses
    with helpers.AgentStream(server.address) as rogue:
        rogue.send(helpers.hello("rogue3"))
        rogue.send(pb.AgentMessage(plan_status=pb.PlanStatus(
            plan_id="fleet-plan", sha256=plan_message(doc).sha256, state=pb.PlanStatus.ROLLED_BACK,
            detail=json.dumps({"cause": "quality_guard", "top1": 0.0}))))
        wait_for(lambda: control.rollout.dropped_statuses == dropped + 1, what="claim dropped")
    assert control.plans.get("fleet-plan").status is PlanStatus.APPLIED
    assert agent.handle.active_plan.plan_id == "fleet-plan"
    control.rollout.rollback("fleet-plan", "test", "test over")
    assert agent.handle.active_plan is None


def test_embedded_control_plane_key_is_trusted_in_process(tmp_path):
    """attach() without an address: this process makes the child's signing key (0600) and
    trusts exactly that key; nothing is learnt from the stream."""
    from headroom_sidecar.agent import attach
    from tests.builders import tiny_llama
    handle = attach(tiny_llama(), embedded_db_path=str(tmp_path / "emb.duckdb"), sample_rate=0.0)
    try:
        ids = handle.control.verifier.key_ids
        assert len(ids) == 1
        from headroom_sidecar.agent.attach import _EMBEDDED
        (cp, _), = [v for k, v in _EMBEDDED._running.items() if k.endswith("emb.duckdb")]
        key_file = cp._tmp_dir / KEY_FILE_NAME
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert PlanSigner.load_or_create(key_file).key_id == ids[0]
    finally:
        handle.detach()
