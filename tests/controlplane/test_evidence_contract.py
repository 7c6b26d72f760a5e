"""Trial evidence has one definition (proto/evidence.py): the agent writes it with
Evidence.to_json, the control plane reads it with parse_evidence_doc and refuses, naming the
field, what the agent would never write."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from headroom_sidecar.controlplane.planner import TrialError
from headroom_sidecar.controlplane.trials import _evidence
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.evidence import (DERIVED_FIELDS, Evidence, EvidenceError,
                                             parse_evidence_doc)


def _evidence_obj(**kw) -> Evidence:
    base = dict(plan_id="p", plan_hash="h", top1_agreement=0.9, mean_kl=0.01, ppl_ratio=1.02,
                exact_match=1.0, latency_ms_per_token_base=2.0, latency_ms_per_token_plan=1.5,
                weight_bytes_base=100, weight_bytes_plan=50, eval_tokens=30, n_prompts=1,
                heads_removed_fraction=0.0, layers_removed_fraction=0.25)
    return Evidence(**{**base, **kw})


def test_what_the_agent_writes_the_control_plane_reads_whole():
    from headroom_sidecar.agent.trial import Evidence as AgentEvidence
    assert AgentEvidence is Evidence
    ev = _evidence_obj(notes=["n"], kernels={"m": {"k": 1}})
    doc = parse_evidence_doc(ev.to_json())
    names = [f.name for f in dataclasses.fields(Evidence)] + list(DERIVED_FIELDS)
    assert sorted(doc) == sorted(names)
    assert doc["memory_ratio"] == 0.5 and doc["ppl_base"] is None     # NaN travels as null
    back = Evidence.from_json(ev.to_json())
    assert back.top1_agreement == 0.9 and math.isnan(back.ppl_base)


@pytest.mark.parametrize("doc, problem", [
    ({"top1_agreement": 0.5}, None),                           # partial: a rule judges it missing
    ({"top1_agreement": None}, None),
    ({"eval_tokens": 0}, None),
    ({"eval_tokens": 1.5}, "eval_tokens: must be an integer, got 1.5"),
    ({"eval_tokens": True}, "eval_tokens: must be an integer, got True"),
    ({"top1_agreement": "high"}, "top1_agreement: must be a number or null, got 'high'"),
    ({"notes": "x"}, "notes: must be a list, got str"),
    ({"top1": 1.0}, "unknown field 'top1'"),
])
def test_evidence_fields_are_checked_by_name(doc, problem):
    if problem is None:
        assert parse_evidence_doc(json.dumps(doc)) == doc
        return
    with pytest.raises(EvidenceError) as e:
        parse_evidence_doc(json.dumps(doc))
    assert e.value.problems == [problem]


def test_control_plane_refuses_bad_evidence_naming_agent_and_field():
    bad = pb.TrialResult(trial_id="t", evidence_json=json.dumps({"mean_kl": "low"}))
    with pytest.raises(TrialError, match=r"agent a1 sent evidence refused: mean_kl: must be a number"):
        _evidence(bad, "a1")
    with pytest.raises(TrialError, match="agent a1 sent evidence refused: must be a JSON object"):
        _evidence(pb.TrialResult(trial_id="t", evidence_json="[1]"), "a1")
    assert _evidence(pb.TrialResult(trial_id="t", evidence_json=_evidence_obj().to_json()),
                     "a1")["top1_agreement"] == 0.9
