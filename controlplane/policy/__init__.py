"""Policy engine: YAML policies in git decide approve / reject / needs_human for each plan.

Load a folder with load_policy_set() or keep one in force with PolicyStore; evaluate() returns a
Decision with every rule's outcome and the policy set's revision. lint, run_tests and replay
make policy changes reviewable (CLI: headroom-controlplane policy lint|test|replay).
"""
from headroom_sidecar.controlplane.policy.engine import evaluate
from headroom_sidecar.controlplane.policy.lint import lint
from headroom_sidecar.controlplane.policy.loader import load_policy_set, read_policy_set
from headroom_sidecar.controlplane.policy.replay import Change, Record, read_records_jsonl, replay
from headroom_sidecar.controlplane.policy.risk import RiskLevel
from headroom_sidecar.controlplane.policy.schema import PolicyError, PolicySet, Problem, Rule, RuleKind
from headroom_sidecar.controlplane.policy.settings import PolicySettings
from headroom_sidecar.controlplane.policy.store import PolicyStore, ReloadResult
from headroom_sidecar.controlplane.policy.testing import run_tests
from headroom_sidecar.controlplane.policy.types import (
    Context, Decision, DeterminismProbe, Evidence, Outcome, Revision, RuleOutcome, RuleResult)
from headroom_sidecar.proto.plan import PlanError, plan_hash as plan_sha256
from headroom_sidecar.proto.plan_fit import ModelFacts

__all__ = [
    "Change", "Context", "Decision", "DeterminismProbe", "Evidence", "ModelFacts", "Outcome",
    "PlanError", "PolicyError", "PolicySet", "PolicySettings", "PolicyStore", "Problem", "Record",
    "ReloadResult", "Revision", "RiskLevel", "Rule", "RuleKind", "RuleOutcome", "RuleResult",
    "evaluate", "lint", "load_policy_set", "plan_sha256", "read_policy_set", "read_records_jsonl",
    "replay", "run_tests",
]
