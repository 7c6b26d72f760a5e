"""What a trial measures on: held-out text (or token ids) and the counts of TrialRequest.eval_json.

The document's fields and their validation are the contract's (proto/evalset.py), which the
agent parses with too, and builds its EvalSet from (agent/control.py). Text comes from the held-out
split of Python's own documentation (controlplane/evaltexts.py), so the planner never measures on
what calibration looked at. A model without a tokenizer (tests' tiny models) gets token ids:
`token_sequences` / `token_prompts` win over `texts` when given. Both paths start every
sequence and prompt with the model's BOS token when its tokenizer adds one (texts: the agent's
EvalSet.from_texts; token ids: token_eval's bos_token_id), so a chunk looks like a request.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from headroom_sidecar.controlplane.evaltexts import Split, texts
from headroom_sidecar.controlplane.settings import resolve_settings
from headroom_sidecar.proto.evalset import FIELDS, EvalSpec

# Characters of held-out text sent per evaluated token: English/code runs ~4 chars per token,
# so 8 leaves room for the agent to cut every sequence and prompt it was asked for.
_CHARS_PER_TOKEN = 8

_KNOWN_KEYS = FIELDS   # the eval_json contract's fields (proto/evalset.py)


def _env(name: str) -> dict:
    return {"env": f"HEADROOM_EVAL_{name}"}


@dataclass(frozen=True)
class EvalSettings:
    # Teacher-forced held-out sequences: this many, of this many tokens each.
    seq_len: int = field(default=64, metadata=_env("SEQ_LEN"))
    max_sequences: int = field(default=4, metadata=_env("MAX_SEQUENCES"))
    # Prompts greedily continued (exact match, decode latency), cut after the sequences.
    prompts: int = field(default=2, metadata=_env("PROMPTS"))
    prompt_tokens: int = field(default=16, metadata=_env("PROMPT_TOKENS"))
    new_tokens: int = field(default=12, metadata=_env("NEW_TOKENS"))
    latency_repeats: int = field(default=3, metadata=_env("LATENCY_REPEATS"))

    def __post_init__(self):
        bad = [f"{f.name}={getattr(self, f.name)} must be > 0" for f in dataclasses.fields(self)
               if f.name != "prompts" and getattr(self, f.name) <= 0]
        if self.prompts < 0:
            bad.append(f"prompts={self.prompts} must be >= 0")
        if self.prompt_tokens > self.seq_len:
            bad.append(f"prompt_tokens={self.prompt_tokens} exceeds seq_len={self.seq_len}")
        if bad:
            raise ValueError("invalid EvalSettings: " + "; ".join(bad))

    @classmethod
    def resolve(cls, **overrides: Any) -> "EvalSettings":
        """Arguments (not None) win, then HEADROOM_EVAL_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "eval")

    @property
    def eval_tokens(self) -> int:
        return self.max_sequences * self.seq_len + self.prompts * self.prompt_tokens


def held_out_texts(settings: EvalSettings) -> list[str]:
    """Enough held-out documentation for the sequences and prompts the settings ask for."""
    max_chars = (settings.max_sequences + settings.prompts) * settings.seq_len * _CHARS_PER_TOKEN
    return texts(Split.HELD_OUT, max_chars=max_chars)


def eval_spec(settings: EvalSettings, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The eval_json document: the settings' counts, held-out texts unless token ids are given.

    overrides: keys of the eval_json contract (e.g. token_sequences from plan.trigger's args).
    The document is validated as the agent will (proto.evalset.EvalSpec): EvalSpecError (a
    ValueError) names each bad field.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_KNOWN_KEYS))
    if unknown:
        raise ValueError(f"eval: unknown field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(_KNOWN_KEYS)}")
    counts = {f.name: overrides.pop(f.name) for f in dataclasses.fields(EvalSettings)
              if f.name in overrides and not isinstance(overrides[f.name], list)}
    resolved = EvalSettings.resolve(**{**dataclasses.asdict(settings), **counts})
    spec = dataclasses.asdict(resolved)
    for name in ("token_sequences", "token_prompts", "traffic_prompts"):
        if name in overrides:
            spec[name] = overrides.pop(name)
    if isinstance(overrides.get("prompts"), list):
        spec["prompts"] = [str(p) for p in overrides.pop("prompts")]
    if "token_sequences" not in spec:
        # Enough text for the counts asked for here, not only for the defaults.
        spec["texts"] = [str(t) for t in overrides.pop("texts", None) or held_out_texts(resolved)]
    return EvalSpec.from_doc(spec).to_doc()


def byte_token_ids(text: str, vocab_size: int) -> list[int]:
    """Real text as token ids for a model without a tokenizer: UTF-8 bytes, folded into the vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be > 0")
    return [b % vocab_size for b in text.encode("utf-8")]


def token_eval(settings: EvalSettings, vocab_size: int,
               source: Optional[Sequence[str]] = None,
               bos_token_id: Optional[int] = None) -> dict:
    """token_sequences / token_prompts cut from held-out text, for a model without a tokenizer.

    bos_token_id: the model's beginning-of-sequence token, when its tokenizer adds one: every
    sequence and prompt then starts with it, as a real request does (a model trained with BOS
    first scores text without it far worse). Lengths stay seq_len / prompt_tokens in all."""
    prefix = _bos_prefix(bos_token_id, vocab_size)
    ids = byte_token_ids("\n\n".join(source or held_out_texts(settings)), vocab_size)
    seq_body, prompt_body = settings.seq_len - len(prefix), settings.prompt_tokens - len(prefix)
    if seq_body < 1:
        raise ValueError(f"seq_len={settings.seq_len}: no room for text after the BOS token "
                         "(needs >= 2 with bos_token_id)")
    need = settings.max_sequences * seq_body + settings.prompts * prompt_body
    if len(ids) < need:
        raise ValueError(f"held-out text gives {len(ids)} tokens; the eval settings need {need}")
    seqs = [prefix + ids[i * seq_body:(i + 1) * seq_body] for i in range(settings.max_sequences)]
    start = settings.max_sequences * seq_body
    prompts = [prefix + ids[start + i * prompt_body:start + (i + 1) * prompt_body]
               for i in range(settings.prompts)]
    return {"token_sequences": seqs, **({"token_prompts": prompts} if prompts else {})}


def _bos_prefix(bos_token_id: Optional[int], vocab_size: int) -> list[int]:
    if bos_token_id is None:
        return []
    if isinstance(bos_token_id, bool) or not isinstance(bos_token_id, int) \
            or not 0 <= bos_token_id < vocab_size:
        raise ValueError(f"bos_token_id={bos_token_id!r}: must be a token id in "
                         f"[0, {vocab_size}) (the model's vocabulary)")
    return [bos_token_id]


def eval_json(settings: EvalSettings, overrides: Optional[Mapping[str, Any]] = None) -> str:
    return json.dumps(eval_spec(settings, overrides), sort_keys=True)
