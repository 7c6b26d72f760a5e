"""The eval-set contract: TrialRequest.eval_json, what a trial measures on. The control plane
writes it (controlplane/evalsets.py), the agent reads it (agent/control.py builds the EvalSet);
both parse and validate it here, so they cannot disagree on a field.

    {"token_sequences": [[ids]], "token_prompts": [[ids]], "texts": [str], "seq_len": 64,
     "max_sequences": 4, "prompts": 2 (count cut from texts) or [str], "prompt_tokens": 16,
     "new_tokens": 12, "latency_repeats": 3, "traffic_prompts": 0}

traffic_prompts > 0: the agent replaces the prompts with up to that many of the prompts it
served most recently for the trial plan's query classes (kept in its memory only; see
agent/observe/prompts.py), and the evidence says how many it used; with none recorded, the
eval set's own prompts are used and the evidence says so.

Every field is optional (defaults shown). Token ids are integers >= 0 in non-empty lists; what
they mean (in the model's vocabulary, sequences of >= 2 tokens) the agent checks against its
model. Errors name the field (and the list index): every problem at once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Union

TokenLists = tuple[tuple[int, ...], ...]

# Field -> the smallest value it takes (counts; seq_len needs a next token to score).
MIN_COUNTS = {"seq_len": 2, "max_sequences": 1, "prompt_tokens": 1, "new_tokens": 1,
              "latency_repeats": 1, "traffic_prompts": 0}
TOKEN_FIELDS = ("token_sequences", "token_prompts")


class EvalSpecError(ValueError):
    """eval_json refused; `problems` names each bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("eval_json refused: " + "; ".join(self.problems))


@dataclass(frozen=True)
class EvalSpec:
    token_sequences: TokenLists = ()
    token_prompts: TokenLists = ()
    texts: tuple[str, ...] = ()
    seq_len: int = 64
    max_sequences: int = 4
    prompts: Union[int, tuple[str, ...]] = 2
    prompt_tokens: int = 16
    new_tokens: int = 12
    latency_repeats: int = 3
    traffic_prompts: int = 0

    @staticmethod
    def from_json(text: str) -> "EvalSpec":
        try:
            doc = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise EvalSpecError([f"not JSON: line {e.lineno}, column {e.colno}: {e.msg}"]) from e
        if not isinstance(doc, dict):
            raise EvalSpecError([f"must be a JSON object, got {type(doc).__name__}"])
        return EvalSpec.from_doc(doc)

    @staticmethod
    def from_doc(doc: Mapping[str, Any]) -> "EvalSpec":
        problems: list[str] = []
        problems += [f"unknown field {k!r} (known: {', '.join(FIELDS)})"
                     for k in sorted(doc.keys() - set(FIELDS))]
        values: dict[str, Any] = {k: _token_lists(doc[k], k, problems)
                                  for k in TOKEN_FIELDS if k in doc}
        if "texts" in doc:
            values["texts"] = _strings(doc["texts"], "texts", problems)
        for k, minimum in MIN_COUNTS.items():
            if k in doc:
                values[k] = _int_at_least(doc[k], k, problems, minimum)
        if "prompts" in doc:
            p = doc["prompts"]
            values["prompts"] = (_strings(p, "prompts", problems) if isinstance(p, (list, tuple))
                                 else _int_at_least(p, "prompts", problems, 0))
        if problems:
            raise EvalSpecError(problems)
        return EvalSpec(**values)

    def to_doc(self) -> dict:
        """The JSON document (lists, not tuples); empty token/text fields left out."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in (*TOKEN_FIELDS, "texts"):
            doc[k] = [list(v) if isinstance(v, tuple) else v for v in doc[k]]
            if not doc[k]:
                del doc[k]
        if isinstance(self.prompts, tuple):
            doc["prompts"] = list(self.prompts)
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_doc(), sort_keys=True)


FIELDS = tuple(f.name for f in dataclasses.fields(EvalSpec))


def _int_at_least(v: Any, where: str, problems: list[str], minimum: int) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        problems.append(f"{where}: must be an integer >= {minimum}, got {v!r}")
        return minimum
    return v


def _strings(v: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if not (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)):
        problems.append(f"{where}: must be a list of strings")
        return ()
    return tuple(v)


def _token_lists(v: Any, where: str, problems: list[str]) -> TokenLists:
    if not isinstance(v, (list, tuple)):
        problems.append(f"{where}: must be a list of token id lists")
        return ()
    out = []
    for i, ids in enumerate(v):
        if not (isinstance(ids, (list, tuple)) and ids and all(isinstance(t, int) and not isinstance(t, bool)
                                                      and t >= 0 for t in ids)):
            problems.append(f"{where}[{i}]: must be a non-empty list of token ids (integers >= 0)")
            continue
        out.append(tuple(ids))
    return tuple(out)
