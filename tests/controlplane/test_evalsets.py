"""Eval text is tokenised as the model expects: every held-out sequence and prompt starts with
the tokenizer's BOS when the tokenizer adds one (texts tokenised by the agent's
EvalSet.from_texts; token ids cut by the control plane's token_eval), and with nothing extra
when it does not."""
from __future__ import annotations

import json

import pytest

from headroom_sidecar.agent.trial import EvalSet
from headroom_sidecar.controlplane.evalsets import EvalSettings, byte_token_ids, eval_spec, token_eval

SETTINGS = EvalSettings(seq_len=24, max_sequences=3, prompts=2, prompt_tokens=8, new_tokens=4,
                        latency_repeats=1)
BOS = 1


def byte_tokenizer(adds_bos: bool):
    """A real Hugging Face fast tokenizer built offline: one token per UTF-8 byte (byte-level
    BPE without merges), BOS = '<s>' (id 1). adds_bos=False: it has a BOS token but, like
    GPT-2's, does not put it in front of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": BOS, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def _texts() -> list[str]:
    return eval_spec(SETTINGS)["texts"]          # held-out documentation, as a trial gets it


def _from_texts(tok, prompts=2, seq_len=SETTINGS.seq_len) -> EvalSet:
    return EvalSet.from_texts(tok, _texts(), seq_len, prompts, SETTINGS.new_tokens,
                              SETTINGS.max_sequences, SETTINGS.prompt_tokens)


def test_tokenizer_really_adds_bos_or_not():
    assert byte_tokenizer(True)("ab")["input_ids"] == [BOS, *byte_tokenizer(True)("ab",
                                                       add_special_tokens=False)["input_ids"]]
    assert BOS not in byte_tokenizer(False)("ab")["input_ids"]
    assert byte_tokenizer(False).bos_token_id == BOS


def test_from_texts_starts_every_sequence_and_prompt_with_bos():
    tok = byte_tokenizer(True)
    ev = _from_texts(tok)
    text_ids = tok("\n\n".join(_texts()), add_special_tokens=False)["input_ids"]
    assert len(ev.sequences) == SETTINGS.max_sequences and len(ev.prompts) == 2
    for s in ev.sequences + ev.prompts:
        assert s[0].item() == BOS and BOS not in s[1:].tolist()
    assert [len(s) for s in ev.sequences] == [SETTINGS.seq_len] * SETTINGS.max_sequences
    assert [len(p) for p in ev.prompts] == [SETTINGS.prompt_tokens] * 2
    body = SETTINGS.seq_len - 1                               # text tokens after BOS
    assert [t for s in ev.sequences for t in s[1:].tolist()] == text_ids[:3 * body]
    assert ev.prompts[0][1:].tolist() == text_ids[3 * body:3 * body + SETTINGS.prompt_tokens - 1]


def test_from_texts_named_prompts_get_one_bos():
    ev = _from_texts(byte_tokenizer(True), prompts=["def f():"])
    assert ev.prompts[0].tolist() == [BOS] + byte_tokenizer(True)(
        "def f():", add_special_tokens=False)["input_ids"]


def test_from_texts_adds_nothing_when_the_tokenizer_does_not():
    tok = byte_tokenizer(False)
    ev = _from_texts(tok)
    text_ids = tok("\n\n".join(_texts()), add_special_tokens=False)["input_ids"]
    assert ev.sequences[0].tolist() == text_ids[:SETTINGS.seq_len]
    assert all(BOS not in s.tolist() for s in ev.sequences + ev.prompts)
    named = _from_texts(tok, prompts=["def f():"])
    assert named.prompts[0].tolist() == tok("def f():")["input_ids"]


def test_from_texts_seq_len_boundary_with_bos():
    ev = _from_texts(byte_tokenizer(True), seq_len=2, prompts=["x"])     # BOS + 1 text token
    assert all(len(s) == 2 and s[0].item() == BOS for s in ev.sequences)
    with pytest.raises(ValueError, match="seq_len=1: no room for text after the BOS"):
        _from_texts(byte_tokenizer(True), seq_len=1, prompts=["x"])


def test_token_eval_starts_with_bos_when_given():
    ev = token_eval(SETTINGS, vocab_size=128, bos_token_id=BOS)
    ids = byte_token_ids("\n\n".join(_texts()), 128)
    seqs, prompts = ev["token_sequences"], ev["token_prompts"]
    assert [len(s) for s in seqs] == [SETTINGS.seq_len] * 3
    assert [len(p) for p in prompts] == [SETTINGS.prompt_tokens] * 2
    assert all(s[0] == BOS for s in seqs + prompts)
    body = SETTINGS.seq_len - 1
    assert [t for s in seqs for t in s[1:]] == ids[:3 * body]
    assert prompts[0][1:] == ids[3 * body:3 * body + SETTINGS.prompt_tokens - 1]


def test_token_eval_without_bos_is_plain_text_ids():
    ev = token_eval(SETTINGS, vocab_size=128)
    ids = byte_token_ids("\n\n".join(_texts()), 128)
    assert ev["token_sequences"][0] == ids[:SETTINGS.seq_len]


@pytest.mark.parametrize("bos, ok", [(127, True), (128, False), (-1, False), (True, False)])
def test_token_eval_bos_must_be_in_the_vocabulary(bos, ok):
    if ok:
        assert token_eval(SETTINGS, 128, bos_token_id=bos)["token_sequences"][0][0] == bos
    else:
        with pytest.raises(ValueError, match="bos_token_id"):
            token_eval(SETTINGS, 128, bos_token_id=bos)


@pytest.mark.parametrize("seq_len, ok", [(2, True), (1, False)])
def test_token_eval_seq_len_boundary_with_bos(seq_len, ok):
    s = EvalSettings(seq_len=seq_len, max_sequences=2, prompts=1, prompt_tokens=1,
                     new_tokens=1, latency_repeats=1)
    if ok:
        ev = token_eval(s, 128, bos_token_id=BOS)
        assert ev["token_sequences"][0][0] == BOS and len(ev["token_sequences"][0]) == 2
        assert ev["token_prompts"] == [[BOS]]
    else:
        with pytest.raises(ValueError, match="no room for text after the BOS"):
            token_eval(s, 128, bos_token_id=BOS)


# ---------------------------------------------------------------------- the contract (proto)
def test_the_agent_parses_eval_json_with_the_contracts_parser():
    from headroom_sidecar.agent import control
    from headroom_sidecar.proto import evalset
    assert control.EvalSpec is evalset.EvalSpec and control.EvalSpecError is evalset.EvalSpecError
    doc = eval_spec(EvalSettings(), {"token_sequences": [[1, 2, 3]], "prompts": ["a b"]})
    assert evalset.EvalSpec.from_doc(doc).to_doc() == doc
    assert evalset.EvalSpec.from_json(json.dumps(doc)).token_sequences == ((1, 2, 3),)


def test_eval_spec_refuses_what_the_agent_would_naming_the_field():
    from headroom_sidecar.proto.evalset import EvalSpecError
    with pytest.raises(EvalSpecError, match=r"token_sequences\[1\]: must be a non-empty list"):
        eval_spec(EvalSettings(), {"token_sequences": [[1], []]})
    with pytest.raises(EvalSpecError, match=r"token_prompts\[0\]: must be a non-empty list"):
        eval_spec(EvalSettings(), {"token_sequences": [[1, 2]], "token_prompts": [[-1]]})


@pytest.mark.parametrize("doc, problem", [
    ({"seq_len": 2}, None), ({"seq_len": 1}, "seq_len: must be an integer >= 2, got 1"),
    ({"prompts": 0}, None), ({"prompts": -1}, "prompts: must be an integer >= 0, got -1"),
    ({"new_tokens": 1}, None), ({"new_tokens": 0}, "new_tokens: must be an integer >= 1"),
    ({"seq_len": True}, "seq_len: must be an integer"),
    ({"colour": 1}, "unknown field 'colour' (known: token_sequences"),
])
def test_eval_json_fields_at_their_bounds(doc, problem):
    from headroom_sidecar.proto.evalset import EvalSpec, EvalSpecError
    if problem is None:
        assert getattr(EvalSpec.from_doc(doc), next(iter(doc))) == next(iter(doc.values()))
    else:
        with pytest.raises(EvalSpecError) as e:
            EvalSpec.from_doc(doc)
        assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("value, ok", [(0, True), (4, True), (-1, False), (True, False)])
def test_traffic_prompts_passes_through_and_is_checked(value, ok):
    if ok:
        assert eval_spec(EvalSettings(), {"traffic_prompts": value})["traffic_prompts"] == value
        return
    with pytest.raises(ValueError, match="traffic_prompts: must be an integer >= 0"):
        eval_spec(EvalSettings(), {"traffic_prompts": value})
