"""Builders for policy tests: a one-rule policy folder, and a plan with its evidence and context."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from headroom_sidecar.controlplane.policy.testing import merge

REPO = Path(__file__).resolve().parents[3]
SHIPPED_POLICIES = REPO / "policies"
NOW_S = 1_700_000_000.0
MODEL = {"num_layers": 8, "num_heads": 4}

BASE_PLAN = {
    "schema": "headroom.plan/v1", "plan_id": "p1", "version": 1, "model_fingerprint": "ab" * 32,
    "query_classes": [], "mode": "structural",
    "transforms": [{"kind": "prune_heads", "heads": {"3": [1]}}],  # 1/32 heads: risk low
    "notes": "",
}
BASE_EVIDENCE = {"top1_agreement": 0.99, "mean_kl": 0.005, "ppl_ratio": 1.004, "exact_match": 0.95,
                 "eval_tokens": 4096, "n_prompts": 8, "latency_ratio": 0.9, "latency_pairs": 6,
                 "determinism_probe": {"runs": 2, "bitwise_identical": True}}
BASE_CONTEXT = {"tenant": "acme", "route": "chat", "query_class": "", "requires_determinism": False,
                "recent_applies_s": [], "now_s": NOW_S}


def inputs(plan=None, evidence=None, context=None, model=None) -> dict:
    """Base inputs with overrides deep-merged (null removes a key, lists replace)."""
    return {"plan": merge(BASE_PLAN, plan or {}), "evidence": merge(BASE_EVIDENCE, evidence or {}),
            "context": merge(BASE_CONTEXT, context or {}), "model": merge(MODEL, model or {})}


def policy_text(rules_yaml: str) -> str:
    body = textwrap.indent(textwrap.dedent(rules_yaml).strip(), "  ")
    return f"schema: headroom.policy/v1\nrules:\n{body}\n"


def write_policy(folder: Path, rules_yaml: str, name: str = "p.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(policy_text(rules_yaml))
    return folder


@pytest.fixture
def policy_dir(tmp_path):
    """write(rules_yaml, name=...) -> folder, in a fresh folder under tmp_path."""
    folder = tmp_path / "policies"
    return lambda rules_yaml, name="p.yaml": write_policy(folder, rules_yaml, name)

