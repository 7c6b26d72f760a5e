"""Fleet page against a real control plane: agents, models, plans run, health."""
from tests.dashboard.helpers import no_exception, tables, texts
from tests.dashboard.kit import AGENT, GONE


def test_fleet_lists_agents_with_model_plan_and_health(world, open_app):
    at = open_app(world.address, "fleet")
    no_exception(at)
    (agents,) = tables(at)
    by_id = agents.set_index("agent")
    assert set(by_id.index) == {AGENT, GONE}
    assert by_id.loc[AGENT, "health"] == "healthy"
    assert by_id.loc[GONE, "health"] == "disconnected"
    # The history plan was rolled back: the agent serves the unoptimised model again.
    assert by_id.loc[AGENT, "plan"] == "unoptimised"
    fingerprint = world.agent.fingerprint
    assert by_id.loc[AGENT, "model"].endswith(fingerprint[:12])
    assert by_id.loc[AGENT, "requests"] >= 6 and by_id.loc[AGENT, "dropped"] == 0
    assert fingerprint in texts(at)           # the full fingerprint in the agent's details
    assert [m.value for m in at.metric][:2] == ["2", "2"]    # 2 agents, 2 models
    assert f"Connected to `{world.address}`" in at.sidebar.success[0].value


def test_fleet_empty_state_says_how_to_attach(empty_server, open_app):
    at = open_app(empty_server.address, "fleet")
    no_exception(at)
    assert not tables(at)
    assert "No agent has registered" in texts(at)
    assert f'agent.attach(model, address="{empty_server.address}")' in texts(at)


def test_fleet_running_plan_shows_while_applied(world, open_app):
    from headroom_sidecar.proto.client import AdminClient
    from tests.dashboard.kit import pending_plan, wait_rollout
    plan_id = pending_plan(world.address)
    with AdminClient(world.address, actor="carol") as admin:
        job = admin.approve_plan(plan_id, "fleet test")
        wait_rollout(admin, job.job_id)
        try:
            at = open_app(world.address, "fleet")
            (agents,) = tables(at)
            assert agents.set_index("agent").loc[AGENT, "plan"] == f"{plan_id} (canary)"
        finally:
            admin.rollback_plan(plan_id, "fleet test cleanup")
