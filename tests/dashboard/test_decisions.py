"""Decisions page: the plan list, and one plan's diff, evidence, policy evaluation rule by rule,
rollout history and rollback cause, as the control plane recorded them."""
from headroom_sidecar.proto.client import AdminClient, reply_json
from tests.dashboard.helpers import chart_titled, no_exception, tables, texts
from tests.dashboard.kit import HISTORY_OPERATOR, ROLLBACK_REASON


def _table_with(at, column: str):
    found = [t for t in tables(at) if column in t.columns]
    assert found, f"no table with a {column!r} column"
    return found[0]


def test_plan_list_and_plan_story(world, open_app):
    at = open_app(world.address, "decisions", plan=world.history_plan)
    no_exception(at)
    plans = _table_with(at, "plan_id").set_index("plan_id")
    assert plans.loc[world.history_plan, "status"] == "rolled_back"
    assert at.selectbox(key="decisions-plan").value == world.history_plan
    with AdminClient(world.address) as admin:
        shown = reply_json(admin.show_plan(world.history_plan))
    diff = next(c.value for c in at.code if c.language == "diff")
    assert diff.splitlines()[0] == f"@@ {shown['diff'][0]} @@"
    assert [line[2:] for line in diff.splitlines()[1:]] == shown["diff"][1:]


def test_evidence_before_and_after(world, open_app):
    at = open_app(world.address, "decisions", plan=world.history_plan)
    with AdminClient(world.address) as admin:
        (trial,) = reply_json(admin.show_plan(world.history_plan))["trials"]
    evidence = _table_with(at, "metric").set_index("metric")
    ev = trial["evidence"]
    assert evidence.loc["latency (ms / token)", "before"] == ev["latency_ms_per_token_base"]
    assert evidence.loc["latency (ms / token)", "after"] == ev["latency_ms_per_token_plan"]
    assert evidence.loc["top-1 agreement", "after"] == ev["top1_agreement"]
    assert evidence.loc["weights (MiB)", "before"] * 2**20 == ev["weight_bytes_base"]
    (latency,) = chart_titled(at, "Latency")["data"]
    assert sorted(latency["value"]) == sorted([ev["latency_ms_per_token_base"],
                                               ev["latency_ms_per_token_plan"]])
    # how the ratio was measured is said next to it: pairs, spread, the thread
    assert (f"latency ratio {ev['latency_ratio']:.3f} (plan / unoptimised): median of "
            f"{ev['latency_pairs']} back-to-back pairs") in texts(at)


def test_policy_rules_rollout_and_rollback_cause(world, open_app):
    at = open_app(world.address, "decisions", plan=world.history_plan)
    rules = _table_with(at, "rule").set_index("rule")
    review = rules.loc["review.exact-match"]
    assert (review["threshold"], review["outcome"]) == ("min 1.5", "needs_human")
    assert review["where"].endswith("loop.yaml:" + review["where"].rsplit(":", 1)[1])
    assert set(rules.index) == {"quality.top1", "structure.layers-cap", "process.rate-limit",
                                "review.exact-match"}
    shown = texts(at)
    with AdminClient(world.address) as admin:
        policy_decision = reply_json(admin.show_plan(world.history_plan))["decisions"][0]
    assert f"policy revision `{policy_decision['policy_revision']}`" in shown
    assert f"by `operator:{HISTORY_OPERATOR}`" in shown       # the operator's approval
    moves = _table_with(at, "change")
    assert list(moves["change"]) == ["∅ → proposed", "proposed → trialled", "trialled → needs_human",
                                     "needs_human → approved", "approved → applying",
                                     "applying → applied", "applied → rolled_back"]
    rollbacks = _table_with(at, "cause")
    requested = rollbacks[rollbacks["event"] == "ROLLBACK_REQUESTED"].iloc[0]
    assert (requested["actor"], requested["cause"]) == (f"operator:{HISTORY_OPERATOR}", ROLLBACK_REASON)
    done = rollbacks[rollbacks["event"] == "ROLLED_BACK"].iloc[0]
    assert done["actor"].startswith("agent:") and done["stage"] == "canary"


def test_status_filter_and_empty_state(world, empty_server, open_app):
    at = open_app(world.address, "decisions")
    at.selectbox(key="decisions-status").set_value("failed").run()
    no_exception(at)
    assert "No plans yet with status failed" in texts(at)
    at = open_app(empty_server.address, "decisions")
    no_exception(at)
    assert "No plans yet." in texts(at) and "headroom-controlplane plan trigger" in texts(at)
