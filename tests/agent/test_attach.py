"""attach(): the handle's parts, local plans and trials, paused traces, text eval sets through a
real server, and serving on while the control plane is unreachable."""
from __future__ import annotations

import collections
import json
import re
import socket
import time

import pytest
import torch

from headroom_sidecar.agent import attach, wire
from headroom_sidecar.agent.adapters import resolve_structure
from headroom_sidecar.agent.control import ControlHandler, EvalSpec, build_evalset
from headroom_sidecar.agent.executor import Executor
from headroom_sidecar.proto.plan import PlanError
from headroom_sidecar.agent.exporter import NoopExporter
from headroom_sidecar.agent.fingerprint import OffloadError, execution_device, fingerprint
from headroom_sidecar.agent.handle import AgentHandle
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.agent.trial import Evidence, stdlib_doc_texts
from headroom_sidecar.controlplane.server import InboundKind
from headroom_sidecar.controlplane.app import start_server
from headroom_sidecar.controlplane.settings import ServerSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto.plandoc import PlanPurpose
from tests.agent.executor import assert_bitwise_equal, greedy, logits, plan, state_snapshot
from tests.agent.test_exporter import wait_until
from tests.builders import tiny_llama, token_ids

SKIP = {"kind": "skip_layers", "layers": [1]}
TOKEN_EVAL = {"token_sequences": [token_ids(12, seed=i)[0].tolist() for i in range(2)],
              "token_prompts": [token_ids(4, seed=7)[0].tolist()], "new_tokens": 2,
              "latency_repeats": 1}


def test_attach_builds_executor_and_control():
    model = tiny_llama()
    handle = attach(model, export_enabled=False, agent_id="parts")
    try:
        assert isinstance(handle.exporter, NoopExporter) and handle.target is None
        assert handle.agent_id == "parts" and handle.gpu_status
        assert isinstance(handle.executor, Executor) and isinstance(handle.control, ControlHandler)
        fp = handle.model_info.fingerprint
        assert handle.executor.fingerprint == fp == fingerprint(model, resolve_structure(model))
        handle.apply_plan(plan(fp, SKIP))
        assert handle.model_info.fingerprint == fp               # still the unoptimised model's
    finally:
        handle.detach()
    assert handle.active_plan is None
    detail = json.loads(handle.control.history[-1].detail)
    assert handle.control.history[-1].state == wire.PlanState.ROLLED_BACK
    assert detail == {"cause": "detach"}


def test_local_trial_is_not_counted_as_requests_and_leaves_the_model():
    model = tiny_llama()
    snap = state_snapshot(model)
    handle = attach(model, export_enabled=False)
    try:
        e = handle.run_trial(plan(handle.model_info.fingerprint, SKIP), TOKEN_EVAL)
        assert e.eval_tokens == 2 * 11 and e.n_prompts == 1 and e.top1_agreement < 1.0
        assert handle.requests_seen == 0                          # trial forwards are not traffic
        assert_bitwise_equal(model, snap)
        assert handle.active_plan is None
    finally:
        handle.detach()


def test_full_traces_pause_while_a_plan_is_active():
    model = tiny_llama()
    s = resolve_structure(model)
    ex = Executor(model, s, fingerprint(model, s))
    cfg = AgentSettings(export_enabled=False, sample_rate=1.0, guard_every_n_requests=0)
    records = []
    handle = AgentHandle(model, s, cfg, sink=records.append, executor=ex,
                         control=ControlHandler(model, s, ex, cfg))
    try:
        logits(model)
        handle.apply_plan(plan(ex.fingerprint, SKIP))
        logits(model), greedy(model, 3)
        handle.rollback("done")
        logits(model)
    finally:
        handle.detach()
    assert [r.trace is not None for r in records] == [True, False, False, True]
    assert [r.output_tokens for r in records] == [1, 1, 3, 1]    # cheap metrics go on
    assert handle.stats().traces_paused_skipped == 2 and handle.errors == 0


def test_control_handler_never_raises_into_the_exporter_thread():
    model = tiny_llama()
    handle = attach(model, export_enabled=False)
    try:
        handle.control.handle("not a command")
        bad_doc = wire.ApplyPlan(wire.PlanMessage("p", 1, "{not json", ""))
        handle.control.handle(bad_doc)
        assert handle.stats().control.errors == 1                 # the unknown command
        refused = handle.control.history[-1]
        # refused before parsing: no signature, no sha256 (tests/security/test_plans_signed.py)
        assert refused.state == wire.PlanState.REFUSED and "sha256" in refused.detail
    finally:
        handle.detach()


# ------------------------------------------------------------------ text eval sets
def _word_tokenizer(texts: list[str], vocab: int):
    """A real tokenizers WordLevel model over the most common words (ids < vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t))
    table = {"[UNK]": 0, **{w: i + 1 for i, (w, _) in enumerate(words.most_common(vocab - 1))}}
    tok = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def texts():
    return stdlib_doc_texts()[:20]


def test_eval_spec_rules(texts):
    tok = _word_tokenizer(texts, 128)
    from_texts = build_evalset(EvalSpec.from_doc({"texts": texts, "seq_len": 16, "max_sequences": 2,
                                                  "prompts": 1, "prompt_tokens": 5}), tok, 128)
    assert [len(s) for s in from_texts.sequences] == [16, 16] and len(from_texts.prompts[0]) == 5
    ids_win = build_evalset(EvalSpec.from_doc({**TOKEN_EVAL, "texts": texts}), None, 128)
    assert [s.tolist() for s in ids_win.sequences] == TOKEN_EVAL["token_sequences"]
    cut = build_evalset(EvalSpec.from_doc({"token_sequences": TOKEN_EVAL["token_sequences"],
                                           "prompts": 1, "prompt_tokens": 3}), None, 128)
    assert [p.tolist() for p in cut.prompts] == [TOKEN_EVAL["token_sequences"][0][:3]]
    strings = build_evalset(EvalSpec.from_doc({"token_sequences": [[1, 2]], "prompts": ["the"]}),
                            tok, 128)
    assert strings.prompts[0].tolist() == tok("the")["input_ids"]


def test_text_trial_through_the_control_plane(tmp_path, texts):
    server = start_server(ServerSettings(db_path=str(tmp_path / "cp.duckdb"), port=0))
    results = []
    server.state.on(InboundKind.TRIAL_RESULT, lambda agent, msg: results.append(msg))
    model = tiny_llama()
    signer = server.state.control.client.signer          # plans from the network are signed
    handle = attach(model, tokenizer=_word_tokenizer(texts, 128), address=server.address,
                    agent_id="texts", sample_rate=0.0, shutdown_timeout_ms=2000,
                    plan_verify_keys=signer.public_b64)
    try:
        assert wait_until(lambda: "texts" in server.state.connected_agents())
        p = plan(handle.model_info.fingerprint, plan_id="identity")
        eval_json = json.dumps({"texts": texts, "seq_len": 16, "max_sequences": 2, "prompts": 1,
                                "prompt_tokens": 6, "new_tokens": 3, "latency_repeats": 1})
        trial = pb.TrialRequest(trial_id="t-text", eval_json=eval_json, plan=signer.sign(pb.Plan(
            plan_id=p.plan_id, version=1, document_json=p.to_json(), sha256=p.hash),
            PlanPurpose.TRIAL))
        assert server.state.send_to_agent("texts", pb.ControlMessage(trial=trial))
        assert wait_until(lambda: results, 30)
        assert results[0].error == ""
        e = Evidence.from_json(results[0].evidence_json)
        assert (e.eval_tokens, e.n_prompts, e.top1_agreement, e.exact_match) == (30, 1, 1.0, 1.0)
    finally:
        handle.detach()
        server.stop(grace_s=0.5)


# ------------------------------------------------------------------ control plane down
@pytest.fixture
def dead_address():
    """Nobody listens: a bound socket without listen() refuses connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_model_keeps_serving_and_plans_work_while_the_control_plane_is_down(dead_address):
    model = tiny_llama()
    ids = token_ids(9)
    bare, bare_gen = logits(model, ids), greedy(model)
    handle = attach(model, address=dead_address, sample_rate=1.0, shutdown_timeout_ms=500,
                    backoff_initial_ms=50, backoff_max_ms=100)
    try:
        assert torch.equal(logits(model, ids), bare) and torch.equal(greedy(model), bare_gen)
        report = handle.apply_plan(plan(handle.model_info.fingerprint, SKIP, plan_id="offline"))
        assert report.layers_skipped == 1 and not torch.equal(logits(model, ids), bare)
        handle.rollback("offline test")
        assert torch.equal(logits(model, ids), bare) and torch.equal(greedy(model), bare_gen)
        states = [r.state for r in handle.control.history]
        assert states == [wire.PlanState.APPLIED, wire.PlanState.ROLLED_BACK]
        assert handle.requests_seen == 5 and handle.errors == 0
        assert not handle.exporter.counters().connected
    finally:
        t0 = time.monotonic()
        handle.detach()
        assert time.monotonic() - t0 < 3.0


# --- accelerate offload: weights on disk / host, parameters on the meta device ----------------

def _offloaded(tmp_path, disk_layer: int = 1):
    """A tiny llama dispatched by accelerate with one decoder layer offloaded to disk."""
    from accelerate import dispatch_model
    model = tiny_llama()
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)}}
    device_map[f"model.layers.{disk_layer}"] = "disk"
    return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))


def test_attach_observes_a_model_with_a_layer_offloaded_to_disk(tmp_path):
    bare = tiny_llama()
    bare_fp = fingerprint(bare, resolve_structure(bare))
    model = _offloaded(tmp_path)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert meta and all(n.startswith("model.layers.1.") for n in meta)
    handle = attach(model, export_enabled=False, sample_rate=1.0)
    records = []
    handle._tracker._sink = records.append        # the records themselves, not the exporter's queue
    try:
        assert handle.model_info.fingerprint == bare_fp           # read from the offloaded weights
        assert handle.model_info.device == "cpu"
        assert torch.equal(greedy(model, 4), greedy(bare, 4))
        (rec,) = records
        assert rec.traced and rec.trace.head_entropy.shape == (3, 4) and handle.errors == 0
        # refused before any weight is touched: the plan would have to move the offloaded layer
        with pytest.raises(PlanError, match="model.layers.1.* is offloaded"):
            handle.apply_plan(plan(bare_fp, SKIP))
        assert handle.active_plan is None and torch.equal(logits(model), logits(bare))
    finally:
        handle.detach()
    assert torch.equal(logits(model), logits(bare))


def test_fingerprint_of_a_fully_cpu_offloaded_model_reads_the_weights_map():
    from accelerate import cpu_offload
    bare, other = tiny_llama(), tiny_llama(seed=1)
    s = resolve_structure(bare)
    model = cpu_offload(tiny_llama())                              # every parameter on meta
    assert all(p.device.type == "meta" for p in model.parameters())
    assert fingerprint(model, s) == fingerprint(bare, s) != fingerprint(cpu_offload(other), s)
    assert execution_device(model) == torch.device("cpu")


def test_attach_refuses_meta_weights_that_nothing_holds():
    model = tiny_llama().to("meta")                                # e.g. init_empty_weights
    with pytest.raises(OffloadError, match=r"'model\.embed_tokens\.weight' is on the meta device"):
        attach(model, export_enabled=False)
    assert not model._forward_hooks and not model._forward_pre_hooks and "generate" not in vars(model)
