"""`headroom-controlplane policy lint|test|replay`: mount with add_policy_commands(subparsers) in the main CLI.

Text by default; `--json` prints one JSON document on `out` instead (same exit codes)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional, TextIO

from headroom_sidecar.controlplane.policy.lint import has_errors, lint
from headroom_sidecar.controlplane.policy.replay import checkout_policies, read_records_jsonl, replay
from headroom_sidecar.controlplane.policy.schema import PolicyError, Problem
from headroom_sidecar.controlplane.policy.settings import PolicySettings
from headroom_sidecar.controlplane.policy.testing import run_tests
from headroom_sidecar.controlplane.cliout import add_json_flag, write_json


def add_policy_commands(subparsers) -> argparse.ArgumentParser:
    """Adds `policy` with its subcommands; each sets args.handler(args, out) -> exit code."""
    policy = subparsers.add_parser("policy", help="lint, test and replay policies/*.yaml")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    p = sub.add_parser("lint", help="check a policy folder: errors exit 1, warnings are shown")
    p.add_argument("folder", nargs="?", default=None, help="policy folder (default: HEADROOM_POLICIES or policies)")
    p.add_argument("--strict", action="store_true", help="warnings also exit 1")
    add_json_flag(p)
    p.set_defaults(handler=handle_lint)
    p = sub.add_parser("test", help="run the policy test cases")
    p.add_argument("--policies", default=None, help="policy folder")
    p.add_argument("--tests", default=None, help="test case folder (default: <policies>/tests)")
    add_json_flag(p)
    p.set_defaults(handler=handle_test)
    p = sub.add_parser("replay", help="which recorded decisions a policy change would change")
    p.add_argument("records", help="JSONL file: one {plan, evidence, context, model} per line")
    p.add_argument("--new", default=None, help="policy folder with the change (default: policies)")
    old = p.add_mutually_exclusive_group(required=True)
    old.add_argument("--old", help="policy folder before the change")
    old.add_argument("--old-rev", help="git revision of the --new folder before the change, e.g. main")
    add_json_flag(p)
    p.set_defaults(handler=handle_replay)
    return policy


def _problem_doc(p: Problem) -> dict:
    return {"file": p.file, "line": p.line, "field": p.field, "reason": p.reason,
            "severity": p.severity.value}


def handle_lint(args, out: TextIO = sys.stdout) -> int:
    folder = PolicySettings.resolve(folder=args.folder).folder
    problems = lint(folder)
    failed = has_errors(problems) or (args.strict and bool(problems))
    if args.json:
        write_json({"folder": str(folder), "ok": not failed, "strict": args.strict,
                     "problems": [_problem_doc(p) for p in problems]}, out)
        return 1 if failed else 0
    for p in problems:
        print(p, file=out)
    print(f"{folder}: {len(problems)} problem(s); {'FAIL' if failed else 'ok'}", file=out)
    return 1 if failed else 0


def handle_test(args, out: TextIO = sys.stdout) -> int:
    settings = PolicySettings.resolve(folder=args.policies, tests_folder=args.tests)
    report = run_tests(settings.folder, settings.tests_folder)
    if args.json:
        write_json(_test_doc(report), out)
        return 0 if report.ok else 1
    for p in report.problems:
        print(p, file=out)
    for r in report.results:
        print(f"{'PASS' if r.passed else 'FAIL'} {r.case.file}:{r.case.line} {r.case.name}", file=out)
        for line in r.diff:
            print(f"    {line}", file=out)
    failed = sum(not r.passed for r in report.results)
    print(f"{len(report.results) - failed} passed, {failed} failed, "
          f"{len(report.problems)} problem(s)", file=out)
    return 0 if report.ok else 1


def _test_doc(report) -> dict:
    cases = [{"file": r.case.file, "line": r.case.line, "name": r.case.name, "passed": r.passed,
              "expected": r.case.expect.value,
              "outcome": r.outcome.value if r.outcome is not None else None,
              "failing_rules": list(r.failing_rules), "diff": list(r.diff)}
             for r in report.results]
    failed = sum(not r.passed for r in report.results)
    return {"ok": report.ok, "passed": len(cases) - failed, "failed": failed, "cases": cases,
            "problems": [_problem_doc(p) for p in report.problems]}


def handle_replay(args, out: TextIO = sys.stdout) -> int:
    new = PolicySettings.resolve(folder=args.new).folder
    try:
        records = read_records_jsonl(args.records)
        with tempfile.TemporaryDirectory() as tmp:
            old = args.old or checkout_policies(new, args.old_rev, os.path.join(tmp, "old"))
            changes = replay(records, old, new)
    except (PolicyError, ValueError, OSError) as e:
        if args.json:
            write_json({"ok": False, "error": str(e), "problems": [
                _problem_doc(p) for p in getattr(e, "problems", ())]}, out)
        else:
            print(f"replay: {e}", file=out)
        return 1
    if args.json:
        write_json({"ok": True, "records": len(records), "changed": [
            {"index": c.index, "plan_id": c.plan_id, "old": c.old.value, "new": c.new.value,
             "rules": list(c.rules)} for c in changes]}, out)
        return 0
    for c in changes:
        print(f"#{c.index} {c.plan_id}: {c.old.value} -> {c.new.value}", file=out)
        for line in c.rules:
            print(f"    {line}", file=out)
    print(f"{len(changes)} of {len(records)} decision(s) would change", file=out)
    return 0


def main(argv: Optional[list[str]] = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="headroom-controlplane")
    add_policy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args, out)


if __name__ == "__main__":
    sys.exit(main())
