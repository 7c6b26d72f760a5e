"""execution.speculative through the executor: model.generate speculates, the output is the
unoptimised model's, and a rollback (or baseline()) leaves no trace."""
from __future__ import annotations

import pytest
import torch

from headroom_sidecar.proto.plan import Plan, SpeculativeDraft
from headroom_sidecar.agent.executor.speculative.install import SpeculativeSettings, installed
from tests.agent.executor import assert_bitwise_equal, plan, rig, state_snapshot
from tests.agent.executor.speculative import INT8_ALL, SKIP_1, execution, self_spec
from tests.builders import ARCH_BUILDERS, token_ids

NEW = 16
SPECS = {"lookup": {"draft": "prompt_lookup", "k": 4}, "self_int8": self_spec(4, INT8_ALL),
         "self_skip": self_spec(1, SKIP_1)}


def _ids() -> torch.Tensor:
    ids = token_ids(9, seed=7)
    return torch.cat([ids, ids], dim=1)                                 # [1, 18]


@torch.no_grad()
def _gen(model, ids, **kw) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          min_new_tokens=NEW, pad_token_id=0, **{"do_sample": False, **kw})


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_generate_speculates_and_rollback_restores(arch, spec):
    model = ARCH_BUILDERS[arch]()
    r, ids = rig(model), _ids()
    ref, snap = _gen(model, ids), state_snapshot(model)
    report = r.executor.apply(plan(r.fingerprint, execution(SPECS[spec])))
    assert any("speculative decoding" in n for n in report.notes)
    assert_bitwise_equal(model, snap)                  # the verifier at rest: draft swapped out
    assert torch.equal(_gen(model, ids), ref)
    g = installed(model)
    assert g.fallbacks == {} and g.last.verify_forwards < NEW + 1 and g.last.emitted == NEW
    with r.executor.baseline():
        assert installed(model) is None and torch.equal(_gen(model, ids), ref)
    assert installed(model) is g
    r.executor.rollback()
    assert "generate" not in vars(model)               # no instance attribute left behind
    assert_bitwise_equal(model, snap)
    assert torch.equal(_gen(model, ids), ref)


def test_requests_it_cannot_serve_run_the_plain_loop():
    model = ARCH_BUILDERS["llama"]()
    r = rig(model)
    two = token_ids(8, batch=2, seed=3)
    ref = _gen(model, two)
    r.executor.apply(plan(r.fingerprint, execution(SPECS["lookup"])))
    assert torch.equal(_gen(model, two), ref)
    assert installed(model).fallbacks == {"batch size is not 1": 1}
    assert torch.equal(_gen(model, two[:1], num_beams=2), _beams(r, two[:1]))
    assert "generation mode beam_search" in installed(model).fallbacks


def _beams(r, ids):
    with r.executor.baseline():
        return _gen(r.model, ids, num_beams=2)


def test_an_error_inside_the_loop_falls_back_to_the_verifier():
    model = ARCH_BUILDERS["llama"]()
    r, ids = rig(model), _ids()
    ref = _gen(model, ids)
    r.executor.apply(plan(r.fingerprint, execution(SPECS["lookup"])))
    g = installed(model)

    class Broken:
        def reset(self):
            pass

        def propose(self, seq, k, sampler):
            raise RuntimeError("draft exploded")
    g.drafter = Broken()
    assert torch.equal(_gen(model, ids), ref)
    assert g.fallbacks == {"error": 1} and "draft exploded" in g.errors[0]


def test_sampling_runs_through_generate():
    model = ARCH_BUILDERS["llama"]()
    r, ids = rig(model), _ids()
    r.executor.apply(plan(r.fingerprint, execution(SPECS["self_skip"])))
    torch.manual_seed(0)
    out = _gen(model, ids, do_sample=True, temperature=0.8, top_k=20)
    g = installed(model)
    assert out.shape == (1, ids.shape[1] + NEW) and g.fallbacks == {}
    assert g.last.emitted == NEW and g.last.proposed > 0


def test_settings_validate():
    assert SpeculativeSettings.resolve().ngram_max == 3
    SpeculativeSettings(ngram_min=1, ngram_max=16)                      # bounds accepted
    with pytest.raises(ValueError, match="ngram_min <= ngram_max <= 16"):
        SpeculativeSettings(ngram_min=1, ngram_max=17)
    with pytest.raises(ValueError, match="1 <= ngram_min"):
        SpeculativeSettings(ngram_min=0, ngram_max=3)


def test_the_plan_parses_to_what_was_installed():
    model = ARCH_BUILDERS["llama"]()
    r = rig(model)
    p: Plan = plan(r.fingerprint, execution(SPECS["self_int8"]))
    r.executor.apply(p)
    assert installed(model).k == 4
    assert p.transforms[0].speculative.draft == SpeculativeDraft.SELF


def test_detach_with_a_speculative_plan_active_leaves_no_wrapper():
    from headroom_sidecar import agent
    model = ARCH_BUILDERS["llama"]()
    ids = _ids()
    ref = _gen(model, ids)
    handle = agent.attach(model, export_enabled=False, sample_rate=0.0)
    handle.apply_plan(plan(handle.model_info.fingerprint, execution(SPECS["lookup"])))
    assert installed(model) is not None and torch.equal(_gen(model, ids), ref)
    handle.detach()
    # rolled back while the request hooks were still there, then the hooks' wrapper removed
    assert "generate" not in vars(model) and installed(model) is None
    assert torch.equal(_gen(model, ids), ref)
