"""Identities and roles: agents are their certificate (no takeover, no speaking for another id),
operators are their certificate or token with a role checked per Admin RPC, and the audit
log records the credential's name, never what the client typed."""
from pathlib import Path

import grpc
import pytest

from headroom_sidecar.controlplane import certs
from headroom_sidecar.controlplane.admin import METHODS
from headroom_sidecar.controlplane.auth import METHOD_ROLES, Role
from headroom_sidecar.proto.credentials import ClientCredentials
from headroom_sidecar.proto.plan import Plan, SkipLayers
from headroom_sidecar.proto.contract import PlanStatus
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from tests.controlplane import helpers
from tests.security.conftest import OPERATORS, SecureWorld


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details() or ""


def _impostor(pki, agent_id: str, tmp_path) -> ClientCredentials:
    """A certificate for agent_id from the real CA, with another key (a stolen CA is not the
    point: a second, different certificate for the same id)."""
    ca_key, ca_cert = certs.load_ca(Path(pki.ca_file).parent)
    pair = certs.write_pair(tmp_path, f"impostor-{agent_id}",
                            *certs.issue(ca_key, ca_cert, agent_id, certs.AGENT_OU))
    return ClientCredentials(ca_file=pki.ca_file, cert_file=pair.cert_file, key_file=pair.key_file)


def _hello(agent_id: str, hostname: str = "host-a"):
    msg = helpers.hello(agent_id)
    msg.hello.hostname = hostname
    return msg


def _ready(stream, seq: int = 1) -> None:
    """The hello went through: a batch on the stream is acked."""
    stream.send(helpers.batch(seq, helpers.tables(helpers.records(1, first_id=seq))))
    reply = stream.recv()
    assert reply.WhichOneof("body") == "ack", reply


def _needs_human_plan(world: SecureWorld, plan_id: str) -> None:
    control = world.server.state.control
    control.plans.add(Plan(plan_id, 1, helpers.MODEL.fingerprint, (SkipLayers((1,)),)).to_doc(),
                      "test")
    control.plans.transition(plan_id, PlanStatus.NEEDS_HUMAN, "policy", "test")


# ---------------------------------------------------------------------- agents
def test_second_certificate_for_a_connected_id_cannot_take_over(secure, tmp_path):
    with secure.agent("agent-1") as real:
        real.send(_hello("agent-1", "real-host"))
        _ready(real)
        with secure.agent("agent-1", credentials=_impostor(secure.pki, "agent-1", tmp_path)) as rogue:
            rogue.send(_hello("agent-1", "rogue-host"))
            reply = rogue.recv()
            assert reply.error.code == "AGENT_ID_MISMATCH" and "bound to another certificate" \
                in reply.error.message
            assert rogue.recv() is None                      # and the stream is over
        _ready(real, seq=2)                                  # the real agent's stream goes on
        with secure.server.store.reader() as cur:
            host = cur.execute("SELECT hostname FROM agents WHERE agent_id = 'agent-1'").fetchall()
        assert host == [("real-host",)]                      # the registry row is untouched
        assert secure.server.state.connected_agents() == ["agent-1"]


@pytest.mark.parametrize("fingerprint, refused", [
    (helpers.MODEL.fingerprint, False),     # the model it registered: reconnects
    ("f0" * 32, True),                      # another model under the same id and certificate
])
def test_a_verified_agent_cannot_pose_as_another_model(secure, fingerprint, refused):
    with secure.agent("agent-1") as first:
        first.send(_hello("agent-1"))
        _ready(first)
    with secure.agent("agent-1") as again:
        msg = _hello("agent-1")
        msg.hello.model.fingerprint = fingerprint
        again.send(msg)
        if not refused:
            _ready(again, seq=2)
            return
        reply = again.recv()
        assert reply.error.code == "AGENT_ID_MISMATCH" and "another model needs another agent id" \
            in reply.error.message
    with secure.server.store.reader() as cur:
        (fp,) = cur.execute("SELECT fingerprint FROM agents WHERE agent_id = 'agent-1'").fetchone()
    assert fp == helpers.MODEL.fingerprint                   # the registry row is untouched


def test_binding_outlives_a_restart_and_admin_can_release_it(pki, secure_settings, tmp_path):
    impostor = _impostor(pki, "agent-1", tmp_path)
    running = start_server(secure_settings)
    world = SecureWorld(running, pki)
    with world.agent("agent-1") as real:
        real.send(_hello("agent-1"))
        _ready(real)
    running.stop(grace_s=0.5)
    running = start_server(secure_settings)                 # same DuckDB file
    world = SecureWorld(running, pki)
    try:
        with world.agent("agent-1", credentials=impostor) as rogue:   # real one is offline
            rogue.send(_hello("agent-1"))
            assert rogue.recv().error.code == "AGENT_ID_MISMATCH"
        with world.admin("alice") as approver:
            code, _ = _code(lambda: approver.unbind_agent("agent-1"))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        with world.admin("adam") as admin:
            assert admin.unbind_agent("agent-1").released is True
        with world.agent("agent-1", credentials=impostor) as renewed:  # re-issued certificate
            renewed.send(_hello("agent-1"))
            _ready(renewed)
    finally:
        running.stop(grace_s=0.5)


def test_reconnect_of_the_same_certificate_replaces_its_own_session(secure):
    with secure.agent("agent-1") as first:
        first.send(_hello("agent-1"))
        _ready(first)
        with secure.agent("agent-1") as second:
            second.send(_hello("agent-1"))
            _ready(second, seq=2)
            assert secure.server.state.connected_agents() == ["agent-1"]


def test_hello_naming_another_id_than_the_certificate_is_refused(secure):
    with secure.agent("agent-2") as s:
        s.send(_hello("agent-1"))
        reply = s.recv()
        assert reply.error.code == "AGENT_ID_MISMATCH" and "certificate is for 'agent-2'" in \
            reply.error.message
        assert s.recv() is None
    assert secure.server.state.connected_agents() == []
    with secure.server.store.reader() as cur:
        assert cur.execute("SELECT count(*) FROM agents").fetchone()[0] == 0


def test_only_verified_agents_can_be_canaries(secure):
    from headroom_sidecar.controlplane.rollout import Fleet
    with secure.agent("agent-2") as s:
        s.send(_hello("agent-2"))
        _ready(s)
        fleet = Fleet(secure.server.store, secure.server.state)
        assert fleet.agents(helpers.MODEL.fingerprint) == ["agent-2"]
        session = secure.server.state._sessions["agent-2"]
        real = session.principal
        session.principal = None                      # as if it had not been authenticated
        try:
            assert fleet.agents(helpers.MODEL.fingerprint) == []
        finally:
            session.principal = real


# ---------------------------------------------------------------------- operators
_ROLE_OF = {name: Role.parse(role) for name, role in OPERATORS.items()}


# Read-only for viewers, planning for operators, verdicts for approvers, the rest for admins.
_EXPECTED_ROLES = {
    Role.VIEWER: {"ListAgents", "ListPlans", "ShowPlan", "GetJob", "ListJobs", "ListAudit",
                  "VerifyAudit", "ShowPolicy", "AnalysisSummary"},
    Role.OPERATOR: {"TriggerPlan"},
    Role.APPROVER: {"ApprovePlan", "RejectPlan", "RollbackPlan"},
    Role.ADMIN: {"ReloadPolicy", "UnbindAgent"},
}


def test_the_role_table_says_who_may_change_what():
    assert {role: {m for m, r in METHOD_ROLES.items() if r is role} for role in Role} == \
        _EXPECTED_ROLES


def test_the_role_table_covers_exactly_the_admin_rpcs():
    service = pb.DESCRIPTOR.services_by_name["Headroom"]
    assert set(METHOD_ROLES) == {m.name for m in service.methods} - {"Connect", "Query"}
    assert set(METHOD_ROLES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHOD_ROLES))
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_method_needs_its_role(secure, name, method):
    """Refused with PERMISSION_DENIED exactly when the role is below the method's (a role equal
    to it passes); allowed callers get past the check (an empty request may then be refused
    as INVALID_ARGUMENT)."""
    channel = secure.operator_credentials(name).channel(secure.address)
    try:
        getattr(headroom_pb2_grpc.HeadroomStub(channel), method)(METHODS[method][0](), timeout=20)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    finally:
        channel.close()
    denied = _ROLE_OF[name] < METHOD_ROLES[method]
    assert (code == grpc.StatusCode.PERMISSION_DENIED) == denied, (name, method, code)


def test_viewer_cannot_approve_and_operator_cannot_reload(secure):
    _needs_human_plan(secure, "p-roles")
    with secure.admin("vera") as viewer:
        code, details = _code(lambda: viewer.approve_plan("p-roles", "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "needs role approver" in details
    with secure.admin_with_token("olga", "operator") as operator:
        code, details = _code(lambda: operator.reload_policy())
        assert code == grpc.StatusCode.PERMISSION_DENIED and "needs role admin" in details
    with secure.agent("agent-1") as agent_stream:       # agents cannot run Admin or Query
        agent_stream.send(_hello("agent-1"))
        _ready(agent_stream)
    agent_creds = secure.agent_credentials("agent-1")
    from headroom_sidecar.proto.client import AdminClient
    with AdminClient(secure.address, credentials=agent_creds, timeout_s=10) as as_agent:
        code, _ = _code(lambda: as_agent.list_agents())
        assert code == grpc.StatusCode.PERMISSION_DENIED


def _audit_actors(world: SecureWorld, subject: str) -> list[str]:
    with world.admin("vera") as viewer:
        return [r.actor for r in viewer.list_audit(subject=subject).rows]


def test_audit_records_the_credential_not_the_typed_name(secure):
    _needs_human_plan(secure, "p-typed")
    with secure.admin("alice", actor="agent:real-agent-0") as approver:
        approver.reject_plan("p-typed", "not today")
    assert _audit_actors(secure, "p-typed")[0] == "operator:alice"
    with secure.admin_with_token("tom", "admin", actor="mallory") as admin:
        admin.reload_policy(actor="operator:someone-else")
    with secure.admin("vera") as viewer:
        rows = viewer.list_audit(kind="POLICY_RELOADED").rows
    assert rows[0].actor == "operator:tom"


def test_agent_exporter_streams_over_mutual_tls(secure):
    """The real agent exporter with its certificate: telemetry arrives under the cert's id."""
    from tests.agent.test_exporter import agent_settings, exporter, record, wait_until
    pair = secure.pki.agents["agent-1"]
    settings = agent_settings(tls_ca_file=secure.pki.ca_file, tls_cert_file=pair.cert_file,
                              tls_key_file=pair.key_file)
    exp = exporter(settings, secure.address, agent_id="agent-1")
    try:
        for i in range(3):
            exp.submit(record(i + 1))
        assert exp.flush(10_000)
        with secure.query_client() as q:
            rows = q.query("SELECT agent_id, count(*) AS n FROM requests GROUP BY 1").table
        assert rows.to_pylist() == [{"agent_id": "agent-1", "n": 3}]
        assert wait_until(lambda: secure.server.state.verified_agents() == ["agent-1"])
    finally:
        exp.shutdown(5_000)


def test_agent_settings_refuse_half_a_certificate(pki):
    from headroom_sidecar.agent.settings import AgentSettings
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        AgentSettings(tls_ca_file=pki.ca_file, tls_cert_file=pki.agents["agent-1"].cert_file)
    with pytest.raises(ValueError, match="needs tls_ca_file"):
        AgentSettings(tls_cert_file="c.pem", tls_key_file="k.pem")
