"""`headroom-controlplane policy lint|test|replay --json`: one JSON document, the text's facts, the
same exit codes."""
from __future__ import annotations

import io
import json
import shutil

from headroom_sidecar.controlplane.policy.cli import main
from headroom_sidecar.controlplane.policy.replay import Record
from tests.controlplane.policy.conftest import SHIPPED_POLICIES, inputs, policy_text

TOP1 = "- {{id: top1, kind: metric_bound, metric: top1_agreement, min: {}, description: d}}"


def cli_json(*argv) -> tuple[int, dict]:
    out = io.StringIO()
    code = main(["policy", *argv, "--json"], out=out)
    return code, json.loads(out.getvalue())   # exactly one document, nothing else


def test_lint_json_is_clean_on_the_shipped_policies():
    code, doc = cli_json("lint", str(SHIPPED_POLICIES))
    assert code == 0 and doc == {"folder": str(SHIPPED_POLICIES), "ok": True, "strict": False,
                                 "problems": []}


def test_lint_json_locates_each_problem(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text("- {id: a, kind: metric_bound, metric: speed, max: 1}"))
    code, doc = cli_json("lint", str(tmp_path))
    assert code == 1 and doc["ok"] is False
    (p,) = [p for p in doc["problems"] if p["severity"] == "error"]
    assert (p["file"], p["line"], p["field"]) == (str(tmp_path / "a.yaml"), 3, "rules[0].metric")
    assert "unknown metric" in p["reason"]


def test_test_json_counts_cases_and_shows_the_diff(tmp_path):
    code, doc = cli_json("test", "--policies", str(SHIPPED_POLICIES))
    assert code == 0 and doc["ok"] and doc["failed"] == 0
    assert doc["passed"] == len(doc["cases"]) > 0
    assert all(c["outcome"] == c["expected"] for c in doc["cases"])
    folder = shutil.copytree(SHIPPED_POLICIES, tmp_path / "policies")
    case_file = sorted((folder / "tests").glob("*.yaml"))[0]
    text = case_file.read_text()
    wrong = text.replace("expect: approve", "expect: reject", 1)
    assert wrong != text, "the shipped tests have an approve case"
    case_file.write_text(wrong)
    code, doc = cli_json("test", "--policies", str(folder))
    assert code == 1 and doc["failed"] == 1 and not doc["ok"]
    (bad,) = [c for c in doc["cases"] if not c["passed"]]
    assert bad["file"] == str(case_file) and bad["expected"] == "reject" and bad["diff"]


def _records_file(path) -> None:
    lines = []
    for i, top1 in enumerate([0.975, 0.985, 0.995, 0.96]):
        ins = inputs(plan={"plan_id": f"p{i}"}, evidence={"top1_agreement": top1})
        lines.append(json.dumps(Record(ins["plan"], ins["evidence"], ins["context"],
                                       ins["model"]).__dict__))
    path.write_text("\n".join(lines) + "\n")


def test_replay_json_lists_the_changed_decisions(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "p.yaml").write_text(policy_text(TOP1.format(0.97)))
    (new / "p.yaml").write_text(policy_text(TOP1.format(0.98)))
    records = tmp_path / "r.jsonl"
    _records_file(records)
    code, doc = cli_json("replay", str(records), "--old", str(old), "--new", str(new))
    assert code == 0
    assert doc == {"ok": True, "records": 4, "changed": [
        {"index": 0, "plan_id": "p0", "old": "approve", "new": "reject",
         "rules": ["top1: pass -> fail"]}]}


def test_replay_json_reports_bad_records(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text('{"plan": {}}\n')
    code, doc = cli_json("replay", str(records), "--old", str(SHIPPED_POLICIES),
                         "--new", str(SHIPPED_POLICIES))
    assert code == 1 and doc["ok"] is False and f"{records}:1" in doc["error"]
