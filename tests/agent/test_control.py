"""The closed loop, agent side: a real control-plane server pushes TrialRequest / ApplyPlan /
Rollback to an attached tiny model and receives the agent's replies."""
from __future__ import annotations

import json
import math

import pytest
import torch

from headroom_sidecar.agent import attach
from headroom_sidecar.agent.control import EvalSpec, EvalSpecError, build_evalset, evalset_hash
from headroom_sidecar.agent.trial import Evidence
from headroom_sidecar.controlplane.server import InboundKind
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.plandoc import PlanPurpose
from tests.agent.executor import assert_bitwise_equal, logits, plan, state_snapshot
from tests.agent.test_exporter import wait_until
from tests.builders import tiny_llama, token_ids

SKIP = {"kind": "skip_layers", "layers": [1]}
PRUNE = {"kind": "prune_heads", "heads": {"0": [0, 1]}}
OTHER_FP = "0" * 64


def eval_doc(seed: int = 0, **kw) -> dict:
    doc = {"token_sequences": [token_ids(16, seed=seed + i)[0].tolist() for i in range(2)],
           "token_prompts": [token_ids(5, seed=seed + 9)[0].tolist()],
           "new_tokens": 3, "latency_repeats": 1}
    return {**doc, **kw}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(ServerSettings(db_path=str(tmp_path_factory.mktemp("cp") / "cp.duckdb"),
                                          port=0))
    yield running
    running.stop(grace_s=0.5)


class Link:
    """One attached tiny model and what the server hears from it."""

    def __init__(self, server, agent_id: str, **settings):
        self.server, self.agent_id = server, agent_id
        self.statuses: list[pb.PlanStatus] = []
        self.trials: list[pb.TrialResult] = []
        server.state.on(InboundKind.PLAN_STATUS, self._collect(self.statuses))
        server.state.on(InboundKind.TRIAL_RESULT, self._collect(self.trials))
        self.model = tiny_llama()
        self.before = state_snapshot(self.model), logits(self.model)
        self.signer = server.state.control.client.signer   # the agent trusts its public key
        self.handle = attach(self.model, address=server.address, agent_id=agent_id,
                             sample_rate=0.0, guard_every_n_requests=0, shutdown_timeout_ms=2000,
                             plan_verify_keys=self.signer.public_b64, **settings)
        self.fp = self.handle.model_info.fingerprint
        assert wait_until(lambda: agent_id in server.state.connected_agents())

    def _collect(self, into: list):
        return lambda agent, msg: into.append(msg) if agent == self.agent_id else None

    def push(self, **body) -> None:
        assert self.server.state.send_to_agent(self.agent_id, pb.ControlMessage(**body))

    def apply(self, p, sha256: str | None = None) -> None:
        self.push(apply_plan=self.signer.sign(_pb_plan(p, sha256), PlanPurpose.APPLY))

    def trial(self, trial_id: str, p, eval_json) -> pb.TrialResult:
        n = len(self.trials)
        text = eval_json if isinstance(eval_json, str) else json.dumps(eval_json)
        signed = self.signer.sign(_pb_plan(p), PlanPurpose.TRIAL)
        self.push(trial=pb.TrialRequest(trial_id=trial_id, plan=signed, eval_json=text))
        # This thread is the serving loop: trials run here, as they would between requests.
        assert wait_until(lambda: self.handle.serve_pending(0.05) >= 0 and len(self.trials) > n, 30)
        return self.trials[n]

    def trial_unserved(self, trial_id: str, p, eval_json) -> pb.TrialResult:
        """A trial while no thread serves: the control thread runs it after trial_handoff_s."""
        n = len(self.trials)
        signed = self.signer.sign(_pb_plan(p), PlanPurpose.TRIAL)
        self.push(trial=pb.TrialRequest(trial_id=trial_id, plan=signed,
                                        eval_json=json.dumps(eval_json)))
        assert wait_until(lambda: len(self.trials) > n, 30)
        return self.trials[n]

    def status(self, n: int) -> pb.PlanStatus:
        """The n-th PlanStatus (0-based), waiting for it."""
        assert wait_until(lambda: len(self.statuses) > n, 30)
        return self.statuses[n]

    def assert_unchanged(self) -> None:
        snap, base = self.before
        assert_bitwise_equal(self.model, snap)
        assert torch.equal(logits(self.model), base)


def _pb_plan(p, sha256: str | None = None) -> pb.Plan:
    return pb.Plan(plan_id=p.plan_id, version=p.version, document_json=p.to_json(),
                   sha256=p.hash if sha256 is None else sha256)


@pytest.fixture
def link(server, request):
    made = Link(server, request.node.name)
    yield made
    made.handle.detach()


# ------------------------------------------------------------------ trials
def test_identity_trial_then_cached_baseline(link):
    got = link.trial("t1", plan(link.fp, plan_id="identity"), eval_doc())
    assert got.trial_id == "t1" and got.error == ""
    e = Evidence.from_json(got.evidence_json)
    assert e.top1_agreement == 1.0 and math.isclose(e.mean_kl, 0.0, abs_tol=1e-7)
    assert e.eval_tokens == 2 * 15 and e.n_prompts == 1 and e.exact_match == 1.0
    first = Evidence.from_json(link.trial("t2", plan(link.fp, SKIP), eval_doc()).evidence_json)
    again = Evidence.from_json(link.trial("t3", plan(link.fp, SKIP), eval_doc()).evidence_json)
    assert link.handle.stats().control.baseline_cache_hits == 2
    assert any("baseline quality: reused" in n for n in again.notes)
    # quality is reused, latency never: each trial timed its own back-to-back pairs
    assert again.latency_pairs == first.latency_pairs > 0
    assert first.top1_agreement < 1.0
    assert (again.top1_agreement, again.mean_kl, again.ppl_ratio, again.exact_match) == \
           (first.top1_agreement, first.mean_kl, first.ppl_ratio, first.exact_match)
    link.trial("t4", plan(link.fp, SKIP), eval_doc(seed=5))          # another eval set: measured
    assert link.handle.stats().control.baseline_cache_hits == 2
    assert again.timed_on == "MainThread (serving_thread)"


def test_trial_nobody_serves_runs_on_the_control_thread_and_says_so(server, request):
    link = Link(server, request.node.name, trial_handoff_s=0.2)
    try:
        e = Evidence.from_json(link.trial_unserved("u1", plan(link.fp, SKIP), eval_doc()).evidence_json)
    finally:
        link.handle.detach()
    assert e.timed_on.endswith("(control_thread)") and not e.timed_on.startswith("MainThread")
    assert any("no serving thread took the trial within 0.2 s" in n for n in e.notes)
    assert link.handle.active_plan is None and link.statuses == []
    link.assert_unchanged()


@pytest.mark.parametrize("case, eval_json, expected", [
    ("bad plan", None, "model_fingerprint"),
    ("not json", "{oops", "not JSON"),
    ("unknown field", eval_doc(bogus=1), "unknown field 'bogus'"),
    ("id out of vocab", eval_doc(token_prompts=[[1, 500]]), "token id 500 out of range"),
    ("texts, no tokenizer", {"texts": ["some text"]}, "need a tokenizer"),
    ("no prompts", {"token_sequences": [[1, 2, 3]], "prompts": 0}, "no prompts"),
])
def test_trial_errors_are_replied(link, case, eval_json, expected):
    p = plan(OTHER_FP if case == "bad plan" else link.fp, SKIP)
    got = link.trial("bad", p, eval_doc() if eval_json is None else eval_json)
    assert got.evidence_json == "" and expected in got.error
    assert link.handle.stats().control.trial_errors == 1
    link.assert_unchanged()


def test_evalset_hash_follows_the_token_ids():
    a = build_evalset(EvalSpec.from_doc(eval_doc()), None, 128)
    b = build_evalset(EvalSpec.from_doc(eval_doc()), None, 128)
    c = build_evalset(EvalSpec.from_doc(eval_doc(new_tokens=4)), None, 128)
    assert evalset_hash(a, 1) == evalset_hash(b, 1) != evalset_hash(a, 2)
    assert evalset_hash(a, 1) != evalset_hash(c, 1)
    with pytest.raises(EvalSpecError, match="seq_len: must be an integer >= 2.*prompts: must be"):
        EvalSpec.from_doc({"seq_len": 1, "prompts": "x"})


# ------------------------------------------------------------------ apply / refuse / rollback
@pytest.mark.parametrize("case", ["fingerprint", "sha256", "layer out of range"])
def test_refused_plans_touch_nothing(link, case):
    fp = OTHER_FP if case == "fingerprint" else link.fp
    bad = {"kind": "skip_layers", "layers": [7]} if case == "layer out of range" else SKIP
    p = plan(fp, bad, plan_id="refuse-me")
    link.apply(p, sha256="ab" * 32 if case == "sha256" else None)
    got = link.status(0)
    assert got.state == pb.PlanStatus.REFUSED and got.plan_id == "refuse-me"
    problems = json.loads(got.detail)["problems"]
    assert any({"fingerprint": "model_fingerprint", "sha256": "sha256",
                "layer out of range": "out of range"}[case] in x for x in problems)
    assert link.handle.active_plan is None and link.handle.stats().control.refused == 1
    link.assert_unchanged()


def test_all_problems_are_listed(link):
    link.apply(plan(OTHER_FP, {"kind": "skip_layers", "layers": [7]}, plan_id="two-problems"))
    problems = json.loads(link.status(0).detail)["problems"]
    assert len(problems) == 2


def test_apply_replace_rollback(link):
    ids = token_ids(10)
    first, second = plan(link.fp, SKIP, plan_id="first"), plan(link.fp, PRUNE, plan_id="second")
    link.apply(first)
    got = link.status(0)
    assert (got.plan_id, got.sha256, got.state) == ("first", first.hash, pb.PlanStatus.APPLIED)
    report = json.loads(got.detail)
    assert report["applied"] == ["skip_layers"] and report["layers_skipped"] == 1
    assert not torch.equal(logits(link.model, ids), link.before[1])
    link.apply(second)                                   # replaces: first rolled back, reported
    replaced, applied = link.status(1), link.status(2)
    assert (replaced.plan_id, replaced.state) == ("first", pb.PlanStatus.ROLLED_BACK)
    assert json.loads(replaced.detail) == {"cause": "replaced", "by": "second"}
    assert (applied.plan_id, applied.state) == ("second", pb.PlanStatus.APPLIED)
    link.apply(second)                                   # the same plan again: idempotent
    assert json.loads(link.status(3).detail)["already_active"] is True
    link.push(rollback=pb.Rollback(plan_id="second", reason="operator"))
    back = link.status(4)
    assert (back.plan_id, back.sha256, back.state) == ("second", second.hash,
                                                       pb.PlanStatus.ROLLED_BACK)
    assert json.loads(back.detail) == {"cause": "control_plane", "reason": "operator",
                                       "was_active": True}
    assert link.handle.active_plan is None
    link.assert_unchanged()
    link.push(rollback=pb.Rollback(plan_id="second", reason="again"))
    assert json.loads(link.status(5).detail)["was_active"] is False


def test_plan_arriving_mid_request_waits_for_the_boundary(link):
    ids = token_ids(10)
    with link.handle.request(tenant="long"):
        before = logits(link.model, ids)
        link.apply(plan(link.fp, SKIP, plan_id="later"))
        assert wait_until(lambda: link.handle.control_waiting, 10)
        during = logits(link.model, ids)                 # second forward of the same request
        assert link.statuses == [] and link.handle.active_plan is None
    assert link.status(0).state == pb.PlanStatus.APPLIED
    after = logits(link.model, ids)
    assert torch.equal(before, during) and not torch.equal(before, after)
    stats = link.handle.stats()
    assert stats.boundary_waits == 1 and stats.requests_seen == 2


def test_apply_from_inside_a_request_on_its_thread_raises(link):
    with link.handle.request():
        logits(link.model)
        with pytest.raises(RuntimeError, match="between requests"):
            link.handle.apply_plan(plan(link.fp, SKIP))
    link.handle.apply_plan(plan(link.fp, SKIP))
    assert link.handle.active_plan is not None


def test_a_class_trial_measures_on_the_classes_recent_prompts(link):
    lookup = {"kind": "execution", "static_kv_cache": False, "compile": "none",
              "speculative": {"draft": "prompt_lookup", "k": 2}}
    code_plan = plan(link.fp, lookup, plan_id="p-code")
    code_plan = type(code_plan).from_doc({**code_plan.doc, "query_classes": ["code"]})
    notes = lambda got: Evidence.from_json(got.evidence_json).notes
    before = link.trial("c1", code_plan, eval_doc(traffic_prompts=2))
    assert Evidence.from_json(before.evidence_json).n_prompts == 1
    assert "prompts: the eval set's 1 (no recent prompt of query class(es) code in this " \
           "agent's memory)" in notes(before)
    for i, (n, query_class) in enumerate([(6, "code"), (7, "code"), (8, "chat"), (9, "code")]):
        with link.handle.request(query_class=query_class):
            link.model.generate(token_ids(n, seed=20 + i), attention_mask=torch.ones(1, n, dtype=torch.long),
                                max_new_tokens=2, do_sample=False, pad_token_id=0)
    after = link.trial("c2", code_plan, eval_doc(traffic_prompts=4))
    assert Evidence.from_json(after.evidence_json).n_prompts == 3     # code's 3, not chat's
    assert "prompts: the 3 most recent of query class(es) code served by this agent" in notes(after)
    plain = link.trial("c3", code_plan, eval_doc())                  # not asked: the eval set's
    assert Evidence.from_json(plain.evidence_json).n_prompts == 1
    assert not any(n.startswith("prompts:") for n in notes(plain))
