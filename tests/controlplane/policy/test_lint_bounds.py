"""lint's safe bounds (controlplane/policy/bounds.py): a looser threshold is an error, a stated
`allow_unsafe` reason turns it into a warning that `--strict` still fails on."""
import io

import pytest

from headroom_sidecar.controlplane.policy.cli import main
from headroom_sidecar.controlplane.policy.lint import has_errors, lint
from headroom_sidecar.controlplane.policy.schema import Severity
from tests.controlplane.policy.conftest import SHIPPED_POLICIES, policy_text


def cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def _lint(tmp_path, rule: str):
    (tmp_path / "a.yaml").write_text(policy_text(rule))
    return lint(str(tmp_path))


def _metric(metric: str, side: str, value, extra: str = "") -> str:
    return f"- {{id: r, kind: metric_bound, metric: {metric}, {side}: {value}, description: d{extra}}}"


# Each bound exactly at its limit passes; a hair beyond it is an error.
@pytest.mark.parametrize("metric, side, at, beyond", [
    ("top1_agreement", "min", 0.9, 0.8999),
    ("ppl_ratio", "max", 1.1, 1.1001),
    ("mean_kl", "max", 0.1, 0.1001),
    ("eval_tokens", "min", 512, 511),
    ("layers_removed_fraction", "max", 0.25, 0.2501),
])
def test_metric_bound_limits(tmp_path, metric, side, at, beyond):
    assert _lint(tmp_path, _metric(metric, side, at)) == []
    (problem,) = _lint(tmp_path, _metric(metric, side, beyond))
    assert problem.severity is Severity.ERROR and problem.field == "r" and problem.line == 3
    assert f"{metric} {side} {beyond:g} is outside the safe bound" in problem.reason
    assert "allow_unsafe" in problem.reason


@pytest.mark.parametrize("cap, error", [(0.25, False), (0.2501, True), (0.97, True)])
def test_layer_skip_cap(tmp_path, cap, error):
    problems = _lint(tmp_path, f"- {{id: c, kind: removal_cap, unit: layers, max_fraction: {cap}, "
                               f"description: d}}")
    assert has_errors(problems) is error
    assert not error or "layers max_fraction" in problems[0].reason


@pytest.mark.parametrize("fields, error", [
    ("max_ratio: 1.0", None),
    ("max_ratio: 1.0001", "latency max_ratio 1.0001 is outside the safe bound <= 1"),
    ("max_ratio: 1.5, trade: memory, reason: sized by memory", None),
    ("max_ratio: 2.0, trade: memory, reason: sized by memory", None),
    ("max_ratio: 2.0001, trade: memory, reason: sized by memory",
     "latency max_ratio (trade memory) 2.0001 is outside the safe bound <= 2"),
    ("max_ratio: 1.0, min_pairs: 4", None),
    ("max_ratio: 1.0, min_pairs: 3", "latency min_pairs 3 is outside the safe bound >= 4"),
])
def test_latency_limits(tmp_path, fields, error):
    problems = _lint(tmp_path, f"- {{id: l, kind: latency, {fields}, description: d}}")
    errors = [p.reason for p in problems if p.severity is Severity.ERROR]
    if error is None:
        assert errors == []
    else:
        (reason,) = errors
        assert error in reason and "allow_unsafe" in reason


def test_the_attackers_set_is_refused_rule_by_rule(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text(
        _metric("ppl_ratio", "max", 100) + "\n" + _metric("mean_kl", "max", 1000000).replace("id: r", "id: k")
        + "\n" + _metric("eval_tokens", "min", 1).replace("id: r", "id: t")
        + "\n" + _metric("top1_agreement", "min", 0.05).replace("id: r", "id: a")
        + "\n- {id: c, kind: removal_cap, unit: layers, max_fraction: 0.97, description: d}"))
    problems = lint(str(tmp_path))
    assert [(p.field, p.severity) for p in problems] == [
        (r, Severity.ERROR) for r in ("r", "k", "t", "a", "c")]
    code, out = cli("policy", "lint", str(tmp_path))
    assert code == 1 and "5 problem(s); FAIL" in out


def test_allow_unsafe_turns_the_error_into_a_warning_that_strict_fails_on(tmp_path):
    problems = _lint(tmp_path, _metric("ppl_ratio", "max", 1.5,
                                       ", allow_unsafe: draft model for a summarizer"))
    (problem,) = problems
    assert problem.severity is Severity.WARNING
    assert problem.reason.endswith("allowed as unsafe: draft model for a summarizer")
    assert cli("policy", "lint", str(tmp_path))[0] == 0
    assert cli("policy", "lint", str(tmp_path), "--strict")[0] == 1


@pytest.mark.parametrize("reason", ['""', '"   "', "null"])
def test_allow_unsafe_needs_a_reason(tmp_path, reason):
    problems = _lint(tmp_path, _metric("ppl_ratio", "max", 1.5, f", allow_unsafe: {reason}"))
    assert has_errors(problems) and "allow_unsafe" in problems[0].field


def test_a_stale_allow_unsafe_is_a_warning(tmp_path):
    (problem,) = _lint(tmp_path, _metric("ppl_ratio", "max", 1.01, ", allow_unsafe: was looser"))
    assert problem.severity is Severity.WARNING and "drop it" in problem.reason


def test_shipped_policies_pass_strict_lint():
    assert lint(str(SHIPPED_POLICIES)) == []
    code, out = cli("policy", "lint", str(SHIPPED_POLICIES), "--strict")
    assert code == 0 and "0 problem(s); ok" in out
