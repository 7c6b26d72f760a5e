"""A plan's readable diff against the unoptimised model (controlplane/plan_diff.py)."""
import pytest

from headroom_sidecar.controlplane.plan_diff import layer_ranges, plan_diff
from headroom_sidecar.proto.plan import parse_plan
from tests.proto.test_plan import SPEC, doc

FACTS = {"num_layers": 30, "num_heads": 9, "dtype": "float32"}
HEAD_DOC = {"kind": "weight_precision", "layers": {"3": "int8", "lm_head": "int8", "1": "int8"}}


def test_plan_diff_lines():
    assert plan_diff(doc(), FACTS) == [
        "scope: structural, query classes: code",
        "layers 0-11, 13-29: weights fp32 -> int8",
        "layer 4 MLP: activations |a| < 0.05 zeroed",
        "layer 3 attention: 9 -> 7 heads (removed 0, 5)",
        "layer 12: skipped",
        "execution: static KV cache, torch.compile",
    ]


@pytest.mark.parametrize("transforms, expected", [
    ([], ["no changes: runs the unoptimised model"]),
    ([{"kind": "weight_precision", "layers": {"7": "int8"}}], ["layer 7: weights bf16 -> int8"]),
    ([{"kind": "weight_precision", "layers": {"lm_head": "int8"}}], ["lm_head: weights bf16 -> int8"]),
    ([HEAD_DOC], ["layers 1, 3: weights bf16 -> int8", "lm_head: weights bf16 -> int8"]),
    ([{"kind": "execution", "static_kv_cache": True, "compile": "cuda_graph"}],
     ["execution: static KV cache, CUDA graphs"]),
    ([{"kind": "execution", "static_kv_cache": False, "compile": "none"}], ["execution: unchanged"]),
    ([{"kind": "skip_layers", "layers": [5, 3]}], ["layer 3: skipped", "layer 5: skipped"]),
])
def test_plan_diff_cases(transforms, expected):
    lines = plan_diff(doc(transforms=transforms, query_classes=[]), {**FACTS, "dtype": "bfloat16"})
    assert lines == ["scope: structural, query classes: all"] + expected


@pytest.mark.parametrize("layers, text", [([], ""), ([4], "4"), ([0, 1, 2, 5, 7, 8], "0-2, 5, 7-8")])
def test_layer_ranges(layers, text):
    assert layer_ranges(layers) == text




def test_plan_diff_takes_a_parsed_plan_and_a_speculative_draft():
    lines = plan_diff(parse_plan(doc(transforms=[SPEC], query_classes=[])), FACTS)
    assert lines[1:] == ["execution: unchanged",
                         "execution: speculative decoding, 4 tokens drafted per verify by self "
                         "under layer 1: weights fp32 -> int8; layer 3: skipped; output stays "
                         "the verifier's"]
