"""Per-query-class plans on a tiny llama: one plan per class, speculation only, routed by the
request's class label; refused before anything is touched when it would change weights."""
from __future__ import annotations

import json

import pytest
import torch

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.control import ControlHandler
from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.agent.fingerprint import fingerprint
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.proto.plan import Plan, PlanError
from headroom_sidecar.agent.settings import AgentSettings
from tests.agent.executor import assert_bitwise_equal, plan, state_snapshot
from tests.agent.executor.speculative import INT8_ALL, SKIP_1, execution, self_spec
from headroom_sidecar.agent.attach import class_plan_refs
from tests.builders import tiny_llama, token_ids

NEW = 12
LOOKUP = {"draft": "prompt_lookup", "k": 4}
CFG = AgentSettings(export_enabled=False, sample_rate=0.0, guard_every_n_requests=0)


class Served:
    """A tiny llama behind a handle with an executor and control handler; its records."""

    def __init__(self):
        self.model = tiny_llama()
        s = resolve_structure(self.model)
        self.fp = fingerprint(self.model, s)
        self.executor = Executor(self.model, s, self.fp)
        self.records, self.replies = [], []
        self.control = ControlHandler(self.model, s, self.executor, CFG)
        self.handle = AgentHandle(self.model, s, CFG, sink=self.records.append,
                                  executor=self.executor, control=self.control)
        self.control._send = self.replies.append
        ids = token_ids(9, seed=7)
        self.ids = torch.cat([ids, ids], dim=1)                 # [1, 18]: prompt lookup finds it

    @torch.no_grad()
    def generate(self, query_class: str = "") -> torch.Tensor:
        with self.handle.request(query_class=query_class):
            return self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids),
                                       max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                       pad_token_id=0)

    def class_plan(self, classes, *transforms, plan_id="p-class"):
        doc = plan(self.fp, *transforms, plan_id=plan_id).doc
        return {**doc, "query_classes": list(classes)}


@pytest.fixture
def served():
    s = Served()
    yield s
    s.handle.detach()


def _detail(report) -> dict:
    return json.loads(report.detail)


def test_a_class_plan_speculates_for_its_class_only(served):
    ref, snap = served.generate(), state_snapshot(served.model)
    served.handle.apply_plan(served.class_plan(["code"], execution(LOOKUP)))
    applied = served.replies[-1]
    assert applied.state == wire.PlanState.APPLIED
    assert _detail(applied)["query_classes"] == ["code"]
    assert _detail(applied)["speculative"] == {"draft": "prompt_lookup", "k": 4, "draft_transforms": 0}
    assert served.handle.active_plan is None and list(served.handle.class_plans) == ["code"]
    outs = [served.generate("code"), served.generate("chat"), served.generate()]
    assert all(torch.equal(o, ref) for o in outs)             # the verifier's own output
    code, chat, plain = served.records[-3:]
    assert code.query_class == "code" and 0 < code.spec_verify_forwards < NEW + 1
    assert code.spec_drafted > 0 and code.spec_accepted <= code.spec_drafted
    assert code.output_tokens == NEW                          # tokens, not forwards
    assert (chat.spec_drafted, chat.spec_verify_forwards) == (0, 0)
    assert (plain.spec_drafted, plain.spec_verify_forwards) == (0, 0)
    assert_bitwise_equal(served.model, snap)


def test_rollback_of_a_class_returns_it_to_the_default(served):
    tracker_generate = served.model.generate
    doc = served.class_plan(["code", "docs"], execution(LOOKUP))
    served.handle.apply_plan(doc)
    h = Plan.from_doc(doc).hash
    assert class_plan_refs(served.control) == [("code", "p-class", h), ("docs", "p-class", h)]
    report = served.handle.rollback("enough", query_class="code")
    assert class_plan_refs(served.control) == [("docs", "p-class", h)]     # the next hello says
    assert report.state == wire.PlanState.ROLLED_BACK and _detail(report)["query_classes"] == ["code"]
    served.generate("code"), served.generate("docs")
    assert served.records[-2].spec_verify_forwards == 0 and served.records[-1].spec_verify_forwards > 0
    served.handle.rollback(query_class="docs")
    assert served.handle.class_plans == {}
    assert served.model.generate is tracker_generate           # no router left in the chain
    again = served.handle.rollback(query_class="docs")
    assert _detail(again)["was_active"] is False


@pytest.mark.parametrize("transforms, differs", [
    ((SKIP_1, execution(LOOKUP)), "skip_layers"),
    ((execution(None, static=True),), "execution"),
])
def test_a_class_plan_that_changes_weights_is_refused_untouched(served, transforms, differs):
    snap = state_snapshot(served.model)
    with pytest.raises(PlanError, match=f"only in execution.speculative.*differs in: {differs}"):
        served.handle.apply_plan(served.class_plan(["code"], *transforms))
    refused = served.replies[-1]
    assert refused.state == wire.PlanState.REFUSED and _detail(refused)["query_classes"] == ["code"]
    assert served.handle.class_plans == {} and "generate" in vars(served.model)
    assert_bitwise_equal(served.model, snap)


def test_the_empty_class_is_refused(served):
    # The plan parser refuses it already; classes.py says why again for a Plan built otherwise.
    with pytest.raises(PlanError, match=r"query_classes\[0\]"):
        served.handle.apply_plan(served.class_plan([""], execution(LOOKUP)))


def test_on_a_default_plan_the_class_plan_keeps_its_weights_and_follows_it(served):
    served.handle.apply_plan(plan(served.fp, SKIP_1, plan_id="p-default"))
    ref = served.generate()
    with pytest.raises(PlanError, match="default plan 'p-default'.*differs in: skip_layers"):
        served.handle.apply_plan(served.class_plan(["code"], execution(LOOKUP)))
    served.handle.apply_plan(served.class_plan(["code"], SKIP_1, execution(LOOKUP)))
    assert torch.equal(served.generate("code"), ref)           # verified by the default plan
    assert served.records[-1].spec_verify_forwards > 0
    served.handle.apply_plan(plan(served.fp, plan_id="p-other"))   # the default changes
    dropped = [r for r in served.replies if r.plan_id == "p-class"][-1]
    assert dropped.state == wire.PlanState.ROLLED_BACK
    detail = _detail(dropped)
    assert (detail["cause"], detail["query_classes"]) == ("replaced", ["code"])
    assert detail["reason"] == "the default plan changed"
    assert served.handle.class_plans == {}


def test_a_class_may_opt_out_of_the_default_speculation(served):
    ref = served.generate()
    served.handle.apply_plan(plan(served.fp, execution(LOOKUP), plan_id="p-default"))
    served.handle.apply_plan(served.class_plan(["chat"], execution(None)))
    assert torch.equal(served.generate("chat"), ref) and torch.equal(served.generate("code"), ref)
    chat, code = served.records[-2:]
    assert chat.spec_verify_forwards == 0 and code.spec_verify_forwards > 0


def test_a_self_draft_class_plan_is_rebuilt_after_a_trial_of_the_default(served):
    from headroom_sidecar.agent.trial import EvalSet
    # The draft quantises the down projection the default's sparsity wrapper holds: a trial
    # re-applies the default with a new wrapper, so the draft must be built on it again.
    sparse = {"kind": "activation_sparsity", "thresholds": {"0": 0.05}}
    draft = {"kind": "weight_precision", "layers": {"0": "int8"}}
    served.handle.apply_plan(plan(served.fp, sparse, plan_id="p-default"))
    ref = served.generate()
    served.handle.apply_plan(served.class_plan(["code"], sparse, execution(self_spec(3, draft))))
    assert torch.equal(served.generate("code"), ref)
    ev = EvalSet(sequences=[token_ids(16, seed=1)[0]], prompts=[token_ids(5, seed=2)[0]],
                 new_tokens=3)
    served.handle.run_trial(plan(served.fp, plan_id="p-trial"), ev, latency_repeats=1)
    assert list(served.handle.class_plans) == ["code"]          # same default: kept
    modules = served.control.classes.routes["code"].runner.drafter.modules
    assert modules.fresh(served.model)                          # rebuilt on the new wrapper
    assert torch.equal(served.generate("code"), ref)
    assert served.records[-1].spec_verify_forwards > 0


def test_detach_removes_class_plans_and_every_wrapper():
    s = Served()
    snap = state_snapshot(s.model)
    s.handle.apply_plan(s.class_plan(["code"], execution(self_spec(2, INT8_ALL))))
    s.generate("code")
    s.handle.detach()
    assert "generate" not in vars(s.model)
    assert_bitwise_equal(s.model, snap)
    assert any(r.state == wire.PlanState.ROLLED_BACK and _detail(r)["cause"] == "detach"
               for r in s.replies)
