"""Trials: measure a plan's evidence against the same model without it, in one run.

Order: baseline quality (unoptimised), apply, plan quality, interleaved latency, rollback; the
model ends as it started (an active plan is rolled back for the trial and re-applied after),
unless `keep_applied`. `trial_with_baseline` skips the baseline quality step when given one
measured earlier on the same eval set (a planner's search trials many plans against one eval
set): quality of the unoptimised model is deterministic, so it is measured once. Latency is
not: it is measured afresh in every trial, plan and baseline interleaved in one window
(agent/latency.py), never reused from an earlier window.

- Teacher-forced held-out sequences: top-1 agreement, mean KL(base || plan), perplexity ratio.
  Baseline log-probs are kept on the host, fp32: eval_tokens * vocab * 4 bytes.
- Prompts, greedy continuation of `new_tokens` through generate() (so execution settings such
  as the static cache apply): exact match; the same prompts are then timed in
  `latency_repeats` rounds of back-to-back pairs (agent/latency.py: per-token decode ms =
  decode time from the first token to the last over the tokens after the first; the ratio =
  median of the pairs' plan/base).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.agent.executor import Executor, weight_bytes
from headroom_sidecar.agent.latency import LatencyResult, generate_timed, interleaved, model_device
from headroom_sidecar.proto.evidence import Evidence
from headroom_sidecar.proto.plan import Plan

_MAX_BASELINE_BYTES = 2 << 30     # refuse eval sets whose baseline log-probs exceed 2 GiB


@dataclass
class EvalSet:
    sequences: list[torch.Tensor]      # each [T] token ids, teacher-forced
    prompts: list[torch.Tensor]        # each [Tp] token ids, greedily continued
    new_tokens: int = 16

    @property
    def eval_tokens(self) -> int:
        return sum(max(len(s) - 1, 0) for s in self.sequences)

    @staticmethod
    def from_texts(tokenizer, texts: Sequence[str], seq_len: int,
                   prompts: Sequence[str] | int, new_tokens: int,
                   max_sequences: int = 8, prompt_tokens: int = 16) -> "EvalSet":
        """Held-out sequences: consecutive `seq_len`-token chunks of the joined texts.
        `prompts`: strings, or a count of `prompt_tokens`-token prompts cut from the chunks
        after the held-out ones. Every sequence and prompt starts with the tokenizer's BOS
        when it adds one (as a real request does: Gemma's perplexity on these texts is ~10x
        worse without it); a chunk is then BOS + seq_len - 1 text tokens."""
        prefix = bos_prefix(tokenizer)
        body = seq_len - len(prefix)                                  # text tokens per chunk
        if body < 1:
            raise ValueError(f"seq_len={seq_len}: no room for text after the BOS token")
        ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"],
                           dtype=torch.long)
        head = torch.tensor(prefix, dtype=torch.long)
        chunks = [torch.cat([head, c]) for c in ids[: len(ids) // body * body].view(-1, body)]
        seqs = chunks[:max_sequences]
        if isinstance(prompts, int):
            rest = chunks[max_sequences:max_sequences + prompts]
            if len(rest) < prompts:
                raise ValueError(f"texts give {len(chunks)} chunks of {seq_len} tokens: not "
                                 f"enough for {max_sequences} sequences + {prompts} prompts")
            ps = [c[:prompt_tokens] for c in rest]
        else:
            ps = [prompt_ids(tokenizer, p) for p in prompts]
        return EvalSet(sequences=seqs, prompts=ps, new_tokens=new_tokens)


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer puts one before a text, as a request's prompt starts; else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """A prompt string as a request's ids [Tp]: BOS (if the tokenizer adds one) + the text,
    without any other special token (some tokenizers also append EOS)."""
    ids = bos_prefix(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def stdlib_doc_texts() -> list[str]:
    """Python's own documentation topics (pydoc_data), real English/code text on every machine."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


# Evidence (what a trial reports, and its JSON) is the contract's: proto/evidence.py.


def latency_fields(lat: LatencyResult | None) -> dict:
    """Evidence fields from an interleaved timing (NaN medians when nothing was timed)."""
    if lat is None:
        return {"latency_ms_per_token_base": float("nan"), "latency_ms_per_token_plan": float("nan")}
    return {"latency_ms_per_token_base": lat.base_ms.median,
            "latency_ms_per_token_plan": lat.plan_ms.median,
            "latency_pairs": lat.ratio.n, "latency_ratio_median": lat.ratio.median,
            "latency_ratio_min": lat.ratio.min, "latency_ratio_max": lat.ratio.max,
            "latency_ms_per_token_base_min": lat.base_ms.min,
            "latency_ms_per_token_base_max": lat.base_ms.max,
            "latency_ms_per_token_plan_min": lat.plan_ms.min,
            "latency_ms_per_token_plan_max": lat.plan_ms.max,
            "warmup_ms_base": lat.warmup_base_ms, "warmup_ms_plan": lat.warmup_plan_ms,
            "timed_on": lat.thread}


@dataclass
class _Measured:
    logprobs: list[torch.Tensor]       # per sequence [T-1, V] fp32 on CPU
    continuations: list[torch.Tensor]  # per prompt [new_tokens]


@torch.no_grad()
def _teacher_forced(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    logits = model(seq.unsqueeze(0).to(model_device(model))).logits[0, :-1]   # [T-1, V]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def _measure(model: nn.Module, ev: EvalSet) -> _Measured:
    logprobs = [_teacher_forced(model, s) for s in ev.sequences]
    conts = [generate_timed(model, p, ev.new_tokens)[0] for p in ev.prompts]
    return _Measured(logprobs, conts)


def _quality(base: _Measured, plan: _Measured) -> dict[str, float]:
    agree, kl, n = 0, 0.0, 0
    for lb, lp in zip(base.logprobs, plan.logprobs):               # [T-1, V] each
        agree += int((lb.argmax(-1) == lp.argmax(-1)).sum())
        kl += float(F.kl_div(lp, lb, log_target=True, reduction="sum"))
        n += lb.shape[0]
    return {"top1_agreement": agree / max(n, 1), "mean_kl": kl / max(n, 1)}


def _ppl(m: _Measured, seqs: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    for lp, s in zip(m.logprobs, seqs):
        nll -= float(lp.gather(1, s[1:].unsqueeze(1)).sum())
        n += lp.shape[0]
    return math.exp(nll / max(n, 1))


@dataclass
class Baseline:
    """The unoptimised side's quality, reusable for later trials on the same eval set (its
    latency is never reused: each trial times both sides interleaved)."""
    measured: _Measured
    weight_bytes: int

    def check_fits(self, ev: EvalSet) -> None:
        lens = [lp.shape[0] + 1 for lp in self.measured.logprobs]
        if lens != [len(s) for s in ev.sequences] or len(self.measured.continuations) != len(ev.prompts):
            raise ValueError("baseline was measured on another eval set (sequence lengths or "
                             "prompt count differ)")


def run_trial(model: nn.Module, structure: ModelStructure, executor: Executor, plan: Plan,
              eval: EvalSet, *, latency_repeats: int = 3, keep_applied: bool = False) -> Evidence:
    return trial_with_baseline(model, structure, executor, plan, eval,
                               latency_repeats=latency_repeats, keep_applied=keep_applied)[0]


def trial_with_baseline(model: nn.Module, structure: ModelStructure, executor: Executor,
                        plan: Plan, eval: EvalSet, *, latency_repeats: int = 3,
                        keep_applied: bool = False,
                        baseline: Baseline | None = None) -> tuple[Evidence, Baseline]:
    """run_trial that reuses the quality `baseline` measured earlier on the same eval set and
    returns the baseline it used, for the next trial."""
    executor.validate(plan)                      # refuse before spending a baseline
    _check_size(model, eval)
    if baseline is not None:
        baseline.check_fits(eval)
    prior = executor.active_plan
    if prior is not None:
        executor.rollback()
    try:
        if baseline is None:
            baseline = Baseline(_measure(model, eval), weight_bytes(model))
        report = executor.apply(plan)
        try:
            planned, bytes_plan = _measure(model, eval), weight_bytes(model)
            latency = _time(model, executor, eval, latency_repeats)
        finally:
            if not keep_applied:
                executor.rollback()
    finally:
        if prior is not None and not keep_applied:
            executor.apply(prior)
    return _evidence(plan, structure, eval, baseline, planned, bytes_plan, report, latency), baseline


def _check_size(model: nn.Module, eval: EvalSet) -> None:
    vocab = logit_width(model)
    if eval.eval_tokens * vocab * 4 > _MAX_BASELINE_BYTES:
        raise ValueError(f"eval set too large: {eval.eval_tokens} tokens x {vocab} vocab fp32 "
                         f"baseline log-probs exceed {_MAX_BASELINE_BYTES >> 30} GiB")


def _time(model: nn.Module, executor: Executor, eval: EvalSet, rounds: int) -> LatencyResult | None:
    """None when there is nothing to time (no prompt, or a single new token: no decode gap)."""
    if not eval.prompts or eval.new_tokens < 2 or rounds < 1:
        return None
    return interleaved(model, executor, eval.prompts, eval.new_tokens, rounds)


def logit_width(model: nn.Module) -> int:
    """Logit width: the head's out_features (nn.Linear and Int8Linear both have it; an int8
    head has no .weight), else config.vocab_size, else 0 (unknown: no size guard)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    width = getattr(head, "out_features", None)
    if width is None:
        width = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(width or 0)


def _evidence(plan, s: ModelStructure, ev: EvalSet, base: Baseline, planned: _Measured,
              bytes_plan: int, report, latency: LatencyResult | None) -> Evidence:
    q = _quality(base.measured, planned)
    ppl_b, ppl_p = _ppl(base.measured, ev.sequences), _ppl(planned, ev.sequences)
    pairs = zip(base.measured.continuations, planned.continuations)
    match = sum(torch.equal(a, b) for a, b in pairs)
    notes = list(report.notes) + ([] if latency else ["latency: not timed (no prompt, or "
                                                       "fewer than 2 new tokens)"])
    return Evidence(
        plan_id=plan.plan_id, plan_hash=plan.hash, top1_agreement=q["top1_agreement"],
        mean_kl=q["mean_kl"], ppl_ratio=ppl_p / ppl_b, exact_match=match / max(len(ev.prompts), 1),
        weight_bytes_base=base.weight_bytes, weight_bytes_plan=bytes_plan,
        eval_tokens=ev.eval_tokens, n_prompts=len(ev.prompts),
        heads_removed_fraction=report.heads_removed / (s.num_layers * s.num_heads),
        layers_removed_fraction=report.layers_skipped / s.num_layers,
        ppl_base=ppl_b, ppl_plan=ppl_p, notes=notes, kernels=dict(getattr(report, "kernels", {})),
        **latency_fields(latency))
