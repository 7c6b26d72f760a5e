import io
import json
import shutil
import subprocess

import pytest

from headroom_sidecar.controlplane.policy import Outcome, RuleKind, lint, load_policy_set, replay, run_tests
from headroom_sidecar.controlplane.policy.cli import main
from headroom_sidecar.controlplane.policy.lint import has_errors
from headroom_sidecar.controlplane.policy.replay import Record, read_records_jsonl
from headroom_sidecar.controlplane.policy.schema import Severity
from tests.controlplane.policy.conftest import SHIPPED_POLICIES, inputs, policy_text

TOP1 = "- {{id: top1, kind: metric_bound, metric: top1_agreement, min: {}, description: d}}"


def cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_shipped_policies_lint_clean():
    assert lint(str(SHIPPED_POLICIES)) == []
    assert cli("policy", "lint", str(SHIPPED_POLICIES), "--strict")[0] == 0


def test_lint_warns_on_rules_that_cannot_do_their_job(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text(
        "- {id: a, kind: metric_bound, metric: top1_agreement, min: 1.5, description: d}\n"
        "- {id: b, kind: removal_cap, unit: heads, max_fraction: 1.0, description: d}\n"
        "- {id: c, kind: determinism, when_requested: false, description: d}\n"
        "- {id: d, kind: rate_limit, max_applies: 3, window_s: 60}"))
    problems = lint(str(tmp_path))
    assert [(p.field, p.line, p.severity) for p in problems] == [
        ("a", 3, Severity.WARNING), ("b", 4, Severity.WARNING), ("c", 5, Severity.WARNING),
        ("d", 6, Severity.WARNING)]
    assert "can never pass" in problems[0].reason and not has_errors(problems)
    assert cli("policy", "lint", str(tmp_path))[0] == 0
    assert cli("policy", "lint", str(tmp_path), "--strict")[0] == 1


@pytest.mark.parametrize("transforms,warned", [
    ("[]", True), ("[execution]", True), ("[execution, skip_layers]", False), ("[weight_precision]", False),
])
def test_lint_warns_on_a_protect_rule_that_forbids_nothing(tmp_path, transforms, warned):
    (tmp_path / "a.yaml").write_text(policy_text(
        f"- {{id: e, kind: protect, layers: [0], transforms: {transforms}, description: d}}"))
    problems = lint(str(tmp_path))
    assert [(p.field, p.line, p.severity) for p in problems] == ([("e", 3, Severity.WARNING)] if warned else [])
    assert all("never fails" in p.reason for p in problems)


def test_lint_cli_fails_on_errors_with_location(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text("- {id: a, kind: metric_bound, metric: speed, max: 1}"))
    code, out = cli("policy", "lint", str(tmp_path))
    assert code == 1 and f"{tmp_path / 'a.yaml'}:3: error: rules[0].metric: unknown metric" in out


def test_shipped_policy_tests_pass_and_cover_every_rule_kind():
    report = run_tests(str(SHIPPED_POLICIES), str(SHIPPED_POLICIES / "tests"))
    assert report.ok, [r.diff for r in report.results if not r.passed] + report.problems
    kinds = {r.id: r.kind for r in load_policy_set(str(SHIPPED_POLICIES)).rules}
    failed_kinds = {kinds[rid] for r in report.results for rid in r.failing_rules}
    assert failed_kinds == set(RuleKind)
    assert {r.outcome for r in report.results} == set(Outcome)
    assert cli("policy", "test", "--policies", str(SHIPPED_POLICIES))[0] == 0


def _copy_shipped(tmp_path):
    return shutil.copytree(SHIPPED_POLICIES, tmp_path / "policies")


def test_wrong_expectation_fails_with_a_diff(tmp_path):
    folder = _copy_shipped(tmp_path)
    cases = folder / "tests" / "safety.yaml"
    text = cases.read_text()
    text = text.replace("  - name: high KL is rejected\n    evidence: {mean_kl: 0.05}\n    expect: reject",
                        "  - name: high KL is rejected\n    evidence: {mean_kl: 0.05}\n    expect: approve")
    text = text.replace("failing_rules: [quality.ppl-ratio]\n  - name: high KL",
                        "failing_rules: [quality.mean-kl]\n  - name: high KL")
    cases.write_text(text)
    report = run_tests(str(folder), str(folder / "tests"))
    failed = {r.case.name: r.diff for r in report.results if not r.passed}
    assert failed == {
        "high KL is rejected": (
            "outcome: expected approve, got reject",
            f"  quality.mean-kl ({folder / 'safety.yaml'}:17) fail: mean_kl 0.05 > max 0.02"),
        "perplexity growth above 1% is rejected": (
            "failing_rules: expected but did not fail: quality.mean-kl",
            "failing_rules: failed but not expected: quality.ppl-ratio"),
    }
    code, out = cli("policy", "test", "--policies", str(folder))
    assert code == 1 and "FAIL" in out and f"{len(report.results) - 2} passed, 2 failed" in out


def test_test_case_file_problems_name_their_line(tmp_path):
    folder = _copy_shipped(tmp_path)
    (folder / "tests" / "broken.yaml").write_text(
        "schema: headroom.policy-tests/v1\ncases:\n  - name: x\n    expect: maybe\n    evidnce: {}\n")
    report = run_tests(str(folder), str(folder / "tests"))
    assert not report.ok
    assert {(p.line, p.field) for p in report.problems} >= {(4, "cases[0].expect"), (5, "cases[0].evidnce")}


def _records() -> list[Record]:
    recs = []
    for i, top1 in enumerate([0.975, 0.985, 0.995, 0.96]):
        ins = inputs(plan={"plan_id": f"p{i}"}, evidence={"top1_agreement": top1})
        recs.append(Record(ins["plan"], ins["evidence"], ins["context"], ins["model"]))
    return recs


def test_replay_lists_exactly_the_changed_decisions(tmp_path):
    old = tmp_path / "old"
    new = tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "p.yaml").write_text(policy_text(TOP1.format(0.97)))
    (new / "p.yaml").write_text(policy_text(TOP1.format(0.99)))
    changes = replay(_records(), str(old), str(new))
    assert [(c.index, c.plan_id, c.old, c.new) for c in changes] == [
        (0, "p0", Outcome.APPROVE, Outcome.REJECT), (1, "p1", Outcome.APPROVE, Outcome.REJECT)]
    assert changes[0].rules == ("top1: pass -> fail",)
    assert replay(_records(), str(old), str(old)) == []


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r.__dict__) for r in records) + "\n")


def test_replay_cli_against_a_git_revision(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.yaml").write_text(policy_text(TOP1.format(0.97)))
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], [*env, "commit", "-qm", "v1"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    (folder / "p.yaml").write_text(policy_text(TOP1.format(0.98)))
    records = tmp_path / "records.jsonl"
    _write_jsonl(records, _records())
    assert len(read_records_jsonl(str(records))) == 4
    code, out = cli("policy", "replay", str(records), "--new", str(folder), "--old-rev", "HEAD")
    assert code == 0, out
    assert out.splitlines() == ["#0 p0: approve -> reject", "    top1: pass -> fail",
                                "1 of 4 decision(s) would change"]


def test_replay_cli_reports_bad_records(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text('{"plan": {}}\nnot json\n')
    code, out = cli("policy", "replay", str(records), "--old", str(SHIPPED_POLICIES),
                    "--new", str(SHIPPED_POLICIES))
    assert code == 1 and f"{records}:1: unknown keys [], missing keys ['evidence', 'model']" in out


@pytest.mark.parametrize("argv", [["policy"], ["policy", "replay", "r.jsonl"]])
def test_cli_usage_errors_exit_nonzero(argv):
    with pytest.raises(SystemExit) as e:
        main(argv, out=io.StringIO())
    assert e.value.code == 2
