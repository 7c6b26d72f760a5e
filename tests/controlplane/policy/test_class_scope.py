"""A rule's `query_classes`: it speaks only to plans scoped to a matching query class; a plan
for another class, and the default plan (no classes), leave it not_applicable."""
from __future__ import annotations

import pytest

from headroom_sidecar.controlplane.policy import (Outcome, PolicyError, RuleOutcome, evaluate,
                                                  load_policy_set)
from tests.controlplane.policy.conftest import inputs, policy_text

# Speculation for grounded classes must be clearly faster; other plans keep the usual bar.
FAST = "- {id: r, kind: latency, max_ratio: 0.8, query_classes: ['grounded*']}"
SLOW_EVIDENCE = {"latency_ratio": 0.9}


@pytest.mark.parametrize("plan_classes, outcome, rule_outcome", [
    (["grounded-code"], Outcome.REJECT, RuleOutcome.FAIL),              # in scope: checked
    (["chat", "grounded"], Outcome.REJECT, RuleOutcome.FAIL),           # one class in scope
    (["chat"], Outcome.APPROVE, RuleOutcome.NOT_APPLICABLE),            # not in scope
    ([], Outcome.APPROVE, RuleOutcome.NOT_APPLICABLE),                  # the default plan
])
def test_a_rule_speaks_to_plans_of_its_classes_only(policy_dir, plan_classes, outcome, rule_outcome):
    policy = load_policy_set(str(policy_dir(FAST)))
    d = evaluate(policy, **inputs(plan={"query_classes": plan_classes}, evidence=SLOW_EVIDENCE))
    assert (d.outcome, d.results[0].outcome) == (outcome, rule_outcome), d.results[0].message
    if rule_outcome is RuleOutcome.NOT_APPLICABLE:
        assert "speaks to plans for query classes ['grounded*']" in d.results[0].message


def test_in_scope_the_rule_is_checked_at_its_bound(policy_dir):
    policy = load_policy_set(str(policy_dir(FAST)))
    at = evaluate(policy, **inputs(plan={"query_classes": ["grounded"]},
                                   evidence={"latency_ratio": 0.8}))
    assert (at.outcome, at.results[0].outcome) == (Outcome.APPROVE, RuleOutcome.PASS)


def test_without_query_classes_a_rule_speaks_to_every_plan(policy_dir):
    policy = load_policy_set(str(policy_dir("- {id: r, kind: latency, max_ratio: 0.8}")))
    d = evaluate(policy, **inputs(evidence=SLOW_EVIDENCE))
    assert d.results[0].outcome is RuleOutcome.FAIL
    assert policy.rules[0].query_classes == ()


@pytest.mark.parametrize("field, reason", [
    ("query_classes: grounded", "query_classes: expected a list"),
    ("query_classes: [1]", "query_classes[0]: expected strings, got an integer"),
    ("query_class: [grounded]", "query_class: unknown field"),
])
def test_bad_query_classes_name_file_line_and_field(tmp_path, field, reason):
    (tmp_path / "bad.yaml").write_text(policy_text(f"- id: r\n  kind: latency\n  max_ratio: 1.0\n"
                                                   f"  {field}"))
    with pytest.raises(PolicyError) as e:
        load_policy_set(str(tmp_path))
    (problem,) = e.value.problems
    assert problem.file.endswith("bad.yaml") and problem.line == 6 and reason in str(problem), \
        str(problem)
