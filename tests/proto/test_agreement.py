"""The disagreements are gone: agent, control plane and policy engine accept and refuse the same
plan documents, because all three parse (proto/plan.py) and fit (proto/plan_fit.py) through
the contract. Each user is exercised through its own entry point, on real parts: the agent's
Executor on a tiny Llama, the control plane's PlanStore on a DuckDB file, the policy engine's
evaluate() on a policy folder."""
from __future__ import annotations

import copy
import hashlib
import threading

import duckdb
import pytest

from headroom_sidecar.controlplane.plans import PlanStore
from headroom_sidecar.controlplane.policy import evaluate, load_policy_set
from headroom_sidecar.proto.plan import PlanError, parse_plan
from headroom_sidecar.proto.plan_fit import check_fits
from tests.agent.executor import plan_doc, rig
from tests.builders import tiny_llama
from tests.controlplane.policy.conftest import BASE_CONTEXT, BASE_EVIDENCE, write_policy

SPEC_SELF = {"kind": "execution", "static_kv_cache": False, "compile": "none",
             "speculative": {"draft": "self", "k": 2,
                             "draft_plan": {"transforms": [{"kind": "skip_layers", "layers": [1]}]}}}

# (name, transforms, or a function that edits the whole document; accepted by all three?)
DOCS = [
    ("valid prune+skip", [{"kind": "prune_heads", "heads": {"0": [1]}},
                          {"kind": "skip_layers", "layers": [2]}], True),
    ("int8 block and head", [{"kind": "weight_precision", "layers": {"1": "int8", "lm_head": "int8"}}], True),
    ("fp32_packed block and head", [{"kind": "weight_precision",
                                     "layers": {"0": "fp32_packed", "lm_head": "fp32_packed"}}], True),
    ("fp32 (not a precision)", [{"kind": "weight_precision", "layers": {"0": "fp32"}}], False),
    ("speculative self draft", [SPEC_SELF], True),     # the policy parser used to refuse it
    ("threshold zero", [{"kind": "activation_sparsity", "thresholds": {"1": 0}}], True),
    ("int4", [{"kind": "weight_precision", "layers": {"1": "int4"}}], False),   # policy accepted
    ("embeddings key", [{"kind": "weight_precision", "layers": {"embeddings": "int8"}}], False),
    ("compile missing", [{"kind": "execution", "static_kv_cache": False}], False),  # policy: 'none'
    ("duplicate kind", [{"kind": "skip_layers", "layers": [0]},
                        {"kind": "skip_layers", "layers": [1]}], False),       # policy merged them
    ("negative threshold", [{"kind": "activation_sparsity", "thresholds": {"1": -1}}], False),
    ("empty head list", [{"kind": "prune_heads", "heads": {"1": []}}], False),  # agent accepted
    ("dynamic prune", lambda d: d.update(mode="dynamic"), False),               # policy accepted
    ("fingerprint not sha256", lambda d: d.update(model_fingerprint="smollm2"), False),
    ("layer out of range", [{"kind": "skip_layers", "layers": [3]}], False),    # 3 layers
    ("head out of range", [{"kind": "prune_heads", "heads": {"0": [4]}}], False),  # 4 heads
    ("every layer skipped", [{"kind": "skip_layers", "layers": [0, 1, 2]}], False),
    ("every head of one layer", [{"kind": "prune_heads", "heads": {"1": [0, 1, 2, 3]}}], True),
]


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    r = rig(tiny_llama())                                        # 3 layers, 4 heads
    folder = write_policy(tmp_path_factory.mktemp("policies"),
                          "- {id: q, kind: metric_bound, metric: top1_agreement, min: 0.5}")
    con = duckdb.connect(str(tmp_path_factory.mktemp("db") / "plans.duckdb"))
    yield r, load_policy_set(str(folder)), PlanStore(con, threading.Lock())
    con.close()


def _verdict(call) -> bool:
    try:
        call()
        return True
    except PlanError:
        return False


def _doc(fingerprint: str, spec, name: str) -> dict:
    base = [{"kind": "prune_heads", "heads": {"0": [1]}}]
    d = plan_doc(fingerprint, *(copy.deepcopy(spec) if isinstance(spec, list) else base),
                 plan_id="agree-" + hashlib.sha256(name.encode()).hexdigest()[:12])
    if callable(spec):
        spec(d)
    return d


@pytest.mark.parametrize("name,spec,accepted", DOCS, ids=[d[0] for d in DOCS])
def test_agent_control_plane_and_policy_engine_agree(users, name, spec, accepted):
    r, policy_set, store = users
    doc = _doc(r.fingerprint, spec, name)
    facts = {"num_layers": r.structure.num_layers, "num_heads": r.structure.num_heads}
    agent = _verdict(lambda: r.executor.validate(parse_plan(doc)))
    control_plane = _verdict(lambda: check_fits(store.add(doc, "planner").plan, facts))
    policy = _verdict(lambda: evaluate(policy_set, doc, dict(BASE_EVIDENCE), facts,
                                       dict(BASE_CONTEXT)))
    assert (agent, control_plane, policy) == (accepted, accepted, accepted)
