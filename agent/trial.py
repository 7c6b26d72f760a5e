"""Trials: measure a plan's evidence against the same model without it, in one run.

Order: baseline (unoptimised), apply, measure, rollback; the model ends as it started (an
active plan is rolled back for the trial and re-applied after), unless `keep_applied`.
`trial_with_baseline` skips the baseline step when given one measured earlier on the same
eval set (a planner's search trials many plans against one eval set).

- Teacher-forced held-out sequences: top-1 agreement, mean KL(base || plan), perplexity ratio.
  Baseline log-probs are kept on the host, fp32: eval_tokens * vocab * 4 bytes.
- Prompts, greedy continuation of `new_tokens` through generate() (so execution settings such
  as the static cache apply): exact match, and per-token decode latency = median of the
  intervals between consecutive decode steps, timed by a logits processor (one call a step).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agent.adapters.base import ModelStructure
from agent.executor import Executor, weight_bytes
from agent.plan import Plan

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
        after the held-out ones."""
        ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
        chunks = list(ids[: len(ids) // seq_len * seq_len].view(-1, seq_len))
        seqs = chunks[:max_sequences]
        if isinstance(prompts, int):
            rest = chunks[max_sequences:max_sequences + prompts]
            if len(rest) < prompts:
                raise ValueError(f"texts give {len(chunks)} chunks of {seq_len} tokens: not "
                                 f"enough for {max_sequences} sequences + {prompts} prompts")
            ps = [c[:prompt_tokens] for c in rest]
        else:
            ps = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
        return EvalSet(sequences=seqs, prompts=ps, new_tokens=new_tokens)


def stdlib_doc_texts() -> list[str]:
    """Python's own documentation topics (pydoc_data), real English/code text on every machine."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


@dataclass
class Evidence:
    plan_id: str
    plan_hash: str
    top1_agreement: float
    mean_kl: float
    ppl_ratio: float
    exact_match: float
    latency_ms_per_token_base: float
    latency_ms_per_token_plan: float
    weight_bytes_base: int
    weight_bytes_plan: int
    eval_tokens: int
    n_prompts: int
    heads_removed_fraction: float
    layers_removed_fraction: float
    ppl_base: float = float("nan")
    ppl_plan: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def latency_ratio(self) -> float:
        return self.latency_ms_per_token_plan / self.latency_ms_per_token_base

    @property
    def memory_ratio(self) -> float:
        return self.weight_bytes_plan / self.weight_bytes_base

    def to_json(self) -> str:
        d = asdict(self)
        d.update(latency_ratio=self.latency_ratio, memory_ratio=self.memory_ratio)
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Evidence":
        d = json.loads(text)
        d.pop("latency_ratio", None), d.pop("memory_ratio", None)
        return Evidence(**d)


@dataclass
class _Measured:
    logprobs: list[torch.Tensor]       # per sequence [T-1, V] fp32 on CPU
    continuations: list[torch.Tensor]  # per prompt [new_tokens]
    step_ms: list[float]


class _StepTimer:
    """A logits processor: generate() calls it once a step; the gaps are step times."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def gaps_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _teacher_forced(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    logits = model(seq.unsqueeze(0).to(_device(model))).logits[0, :-1]   # [T-1, V]
    return F.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    dev = _device(model)
    timer = _StepTimer(dev)
    ids = prompt.unsqueeze(0).to(dev)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, logits_processor=[timer],
                         pad_token_id=0)
    return out[0, ids.shape[1]:].cpu(), timer.gaps_ms()


def _measure(model: nn.Module, ev: EvalSet, repeats: int) -> _Measured:
    logprobs = [_teacher_forced(model, s) for s in ev.sequences]
    conts, steps = [], []
    for p in ev.prompts:
        cont, gaps = _generate(model, p, ev.new_tokens)
        conts.append(cont)
        steps += gaps
        for _ in range(repeats - 1):
            steps += _generate(model, p, ev.new_tokens)[1]
    return _Measured(logprobs, conts, steps)


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
    """The unoptimised side of a trial, reusable for later trials on the same eval set."""
    measured: _Measured
    weight_bytes: int
    latency_repeats: int

    def check_fits(self, ev: EvalSet, latency_repeats: int) -> None:
        lens = [lp.shape[0] + 1 for lp in self.measured.logprobs]
        if lens != [len(s) for s in ev.sequences] or len(self.measured.continuations) != len(ev.prompts) \
                or self.latency_repeats != latency_repeats:
            raise ValueError("baseline was measured on another eval set (sequence lengths, prompt "
                             "count or latency_repeats differ)")


def run_trial(model: nn.Module, structure: ModelStructure, executor: Executor, plan: Plan,
              eval: EvalSet, *, latency_repeats: int = 3, keep_applied: bool = False) -> Evidence:
    return trial_with_baseline(model, structure, executor, plan, eval,
                               latency_repeats=latency_repeats, keep_applied=keep_applied)[0]


def trial_with_baseline(model: nn.Module, structure: ModelStructure, executor: Executor,
                        plan: Plan, eval: EvalSet, *, latency_repeats: int = 3,
                        keep_applied: bool = False,
                        baseline: Baseline | None = None) -> tuple[Evidence, Baseline]:
    """run_trial that reuses a `baseline` measured earlier on the same eval set (it is not
    measured again) and returns the baseline it used, for the next trial."""
    executor.validate(plan)                      # refuse before spending a baseline
    vocab = logit_width(model)
    if eval.eval_tokens * vocab * 4 > _MAX_BASELINE_BYTES:
        raise ValueError(f"eval set too large: {eval.eval_tokens} tokens x {vocab} vocab fp32 "
                         f"baseline log-probs exceed {_MAX_BASELINE_BYTES >> 30} GiB")
    if baseline is not None:
        baseline.check_fits(eval, latency_repeats)
    prior = executor.active_plan
    if prior is not None:
        executor.rollback()
    try:
        if baseline is None:
            baseline = Baseline(_measure(model, eval, latency_repeats), weight_bytes(model),
                                latency_repeats)
        report = executor.apply(plan)
        try:
            planned, bytes_plan = _measure(model, eval, latency_repeats), weight_bytes(model)
        finally:
            if not keep_applied:
                executor.rollback()
    finally:
        if prior is not None and not keep_applied:
            executor.apply(prior)
    return _evidence(plan, structure, eval, baseline.measured, planned, baseline.weight_bytes,
                     bytes_plan, report), baseline


def logit_width(model: nn.Module) -> int:
    """Logit width: the head's out_features (nn.Linear and Int8Linear both have it; an int8
    head has no .weight), else config.vocab_size, else 0 (unknown: no size guard)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    width = getattr(head, "out_features", None)
    if width is None:
        width = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(width or 0)


def _evidence(plan, s: ModelStructure, ev: EvalSet, base: _Measured, planned: _Measured,
              bytes_base: int, bytes_plan: int, report) -> Evidence:
    q = _quality(base, planned)
    ppl_b, ppl_p = _ppl(base, ev.sequences), _ppl(planned, ev.sequences)
    match = sum(torch.equal(a, b) for a, b in zip(base.continuations, planned.continuations))
    return Evidence(
        plan_id=plan.plan_id, plan_hash=plan.hash, top1_agreement=q["top1_agreement"],
        mean_kl=q["mean_kl"], ppl_ratio=ppl_p / ppl_b, exact_match=match / max(len(ev.prompts), 1),
        latency_ms_per_token_base=statistics.median(base.step_ms) if base.step_ms else float("nan"),
        latency_ms_per_token_plan=statistics.median(planned.step_ms) if planned.step_ms else float("nan"),
        weight_bytes_base=bytes_base, weight_bytes_plan=bytes_plan, eval_tokens=ev.eval_tokens,
        n_prompts=len(ev.prompts),
        heads_removed_fraction=report.heads_removed / (s.num_layers * s.num_heads),
        layers_removed_fraction=report.layers_skipped / s.num_layers,
        ppl_base=ppl_b, ppl_plan=ppl_p, notes=list(report.notes))
