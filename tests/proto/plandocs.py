"""A valid headroom.plan/v1 document touching every transform kind, for the plan tests
(tests/proto/test_plan.py, tests/controlplane/test_plans.py)."""
from __future__ import annotations

FP = "ab" * 32


def doc(**over) -> dict:
    d = {"schema": "headroom.plan/v1", "plan_id": "p-1", "version": 1, "model_fingerprint": FP,
         "query_classes": ["code"], "mode": "structural",
         "transforms": [
             {"kind": "prune_heads", "heads": {"3": [0, 5]}},
             {"kind": "skip_layers", "layers": [12]},
             {"kind": "activation_sparsity", "thresholds": {"4": 0.05}},
             {"kind": "weight_precision", "layers": {str(i): "int8" for i in range(30) if i != 12}},
             {"kind": "execution", "static_kv_cache": True, "compile": "torch_compile"}],
         "notes": "hand-written"}
    d.update(over)
    return d
