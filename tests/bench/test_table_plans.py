"""bench/table.py's plan documents are valid plans that fit the model they are built for.
(`make bench-table` failed for a while on plan ids the contract refuses, and nothing noticed.)"""
from __future__ import annotations

import pytest

from bench.table import calibrate, headroom_plans, prune_plan, sparsity_int8_plan
from headroom_sidecar.proto.plan import Plan
from tests.agent.executor import plan_doc, rig
from tests.builders import tiny_llama, token_ids

# A plan like `make demo` leaves in .headroom/best-plan.json (int8 and fp32_packed layers),
# with compiled decode, as the loop keeps it when it measures faster.
LOOP_PLAN = [{"kind": "weight_precision", "layers": {"0": "fp32_packed", "1": "int8",
                                                     "2": "int8", "lm_head": "fp32_packed"}},
             {"kind": "execution", "static_kv_cache": True, "compile": "torch_compile"}]


@pytest.mark.parametrize("loop_plan", ["bench rules", "a demo's plan file"])
def test_every_row_plan_is_valid_and_fits_the_model(loop_plan):
    r = rig(tiny_llama())
    s, fp = r.structure, r.fingerprint
    stats = calibrate(r.model, s, [token_ids(16, seed=i)[0] for i in range(2)])
    plan = sparsity_int8_plan(fp, s, stats, 0.3) if loop_plan == "bench rules" else \
        plan_doc(fp, *LOOP_PLAN, plan_id="job-1-t007")
    docs = headroom_plans(fp, s, plan, loop_plan, prune_plan(fp, s, stats, 1, 0.1), with_prune=True)
    assert len(docs) == 8 and len({doc["plan_id"] for _, _, doc in docs}) == 8
    for _name, _source, doc in docs:
        r.executor.validate(Plan.from_doc(doc))      # PlanError names what does not fit
