"""Policy test cases (policies/tests/*.yaml): a plan, its evidence and context, and the expected decision."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from headroom_sidecar.controlplane.policy.engine import evaluate
from headroom_sidecar.controlplane.policy.loader import read_policy_set
from headroom_sidecar.proto.plan import PlanError
from headroom_sidecar.controlplane.policy.schema import PolicySet, Problem
from headroom_sidecar.controlplane.policy.types import Outcome
from headroom_sidecar.controlplane.policy.yamlread import Reader, compose_file, line_of, to_python

TESTS_SCHEMA = "headroom.policy-tests/v1"
# Cases that give no context.now_s are judged at this instant, so a run never depends on the clock.
FIXED_NOW_S = 1_700_000_000.0
INPUT_KEYS = ("plan", "evidence", "context", "model")


@dataclass(frozen=True)
class Case:
    file: str
    line: int
    name: str
    inputs: dict[str, Any]        # plan, evidence, context, model: defaults merged in
    expect: Outcome
    failing_rules: Optional[frozenset[str]]  # None: not checked


@dataclass(frozen=True)
class CaseResult:
    case: Case
    passed: bool
    outcome: Optional[Outcome]
    failing_rules: tuple[str, ...]
    diff: tuple[str, ...]         # one line per difference; empty when passed


@dataclass
class PolicyTestReport:
    results: list[CaseResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.results) and all(r.passed for r in self.results)


def run_tests(policy_folder: str, tests_folder: str) -> PolicyTestReport:
    policy_set, problems = read_policy_set(policy_folder)
    cases, case_problems = read_cases(tests_folder)
    report = PolicyTestReport(problems=problems + case_problems)
    if policy_set is None:
        return report
    report.results = [run_case(policy_set, c) for c in cases]
    return report


def run_case(policy_set: PolicySet, case: Case) -> CaseResult:
    try:
        decision = evaluate(policy_set, **case.inputs, clock=lambda: FIXED_NOW_S)
    except (PlanError, ValueError) as e:
        return CaseResult(case, False, None, (), (f"inputs rejected before any rule ran: {e}",))
    failing = tuple(r.rule_id for r in decision.failing())
    diff = []
    if decision.outcome is not case.expect:
        diff.append(f"outcome: expected {case.expect.value}, got {decision.outcome.value}")
        diff += [f"  {r.rule_id} ({r.file}:{r.line}) {r.outcome.value}: {r.message}"
                 for r in decision.failing()]
    if case.failing_rules is not None:
        missing = sorted(case.failing_rules - set(failing))
        extra = sorted(set(failing) - case.failing_rules)
        if missing:
            diff.append(f"failing_rules: expected but did not fail: {', '.join(missing)}")
        if extra:
            diff.append(f"failing_rules: failed but not expected: {', '.join(extra)}")
    return CaseResult(case, not diff, decision.outcome, failing, tuple(diff))


def read_cases(folder: str) -> tuple[list[Case], list[Problem]]:
    if not os.path.isdir(folder):
        return [], [Problem(folder, 0, "", "no such tests folder")]
    names = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml")))
    cases: list[Case] = []
    problems: list[Problem] = []
    for name in names:
        cases += _read_case_file(os.path.join(folder, name), problems)
    if not names:
        problems.append(Problem(folder, 0, "", "no *.yaml test files"))
    return cases, problems


def _read_case_file(path: str, problems: list[Problem]) -> list[Case]:
    root = compose_file(path, path, problems)
    top = Reader(root, path, "", problems) if root is not None else None
    if top is None or not top.ok:
        return []
    if top.string("schema", required=True) not in (None, TESTS_SCHEMA):
        top.fail(top.value_node("schema"), "schema", f"expected {TESTS_SCHEMA!r}")
    defaults = _read_inputs(top.sub("defaults"))
    nodes = top.seq("cases", required=True)
    top.finish()
    cases = [_read_case(n, path, f"cases[{i}]", defaults, problems) for i, n in enumerate(nodes)]
    return [c for c in cases if c is not None]


def _read_inputs(r: Optional[Reader]) -> dict[str, Any]:
    """plan/evidence/context/model mappings of a case or of the file's defaults."""
    if r is None or not r.ok:
        return {}
    out = {}
    for key in INPUT_KEYS:
        node = r.value_node(key)
        if node is not None:
            value = to_python(node)
            if isinstance(value, dict):
                out[key] = value
            else:
                r.fail(node, key, "expected a mapping")
    return out


def _read_case(node, path: str, where: str, defaults: dict[str, Any],
               problems: list[Problem]) -> Optional[Case]:
    before = len(problems)
    r = Reader(node, path, where, problems)
    if not r.ok:
        return None
    name = r.string("name", required=True)
    expect = r.choice("expect", Outcome, required=True)
    failing = r.str_list("failing_rules")
    own = _read_inputs(r)
    r.finish()
    inputs = {k: merge(defaults.get(k, {}), own.get(k, {})) for k in INPUT_KEYS}
    for key in INPUT_KEYS:
        if not inputs[key] and key != "context":
            r.fail(node, key, "missing (neither in the case nor in defaults)")
    if len(problems) > before:
        return None
    return Case(file=path, line=line_of(node), name=name, inputs=inputs, expect=expect,
                failing_rules=None if failing is None else frozenset(failing))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings; lists and scalars replace; a null in over removes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
