"""execution.speculative, installed: `model.generate` runs the speculative loop.

The executor's execution applier calls `install_speculative`, which records in the plan's undo
log a wrapper in the model instance's `generate` attribute (the spot the agent's request
observer already uses). The wrapper calls the generate it found there (so the observer still
opens the request) with transformers' `custom_generate=` hook: transformers prepares the
generation config, logits processors and stopping criteria as usual, then hands the decoding
loop to `SpeculativeGenerate._loop`. No forward is patched; a rollback, or
`Executor.baseline()`, takes the wrapper out with the rest of the plan.

Requests speculation cannot serve (batch > 1, padding, beams, streamers, dict outputs, a cache
given by the caller, an uncroppable cache) run transformers' own loop, counted in
`fallbacks`; an error inside the speculative loop does the same (the output is the verifier's
either way). Self-drafting swaps modules in and out of the shared model, so its requests are
serialised by `lock`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from headroom_sidecar.agent.executor.undo import UndoLog
from headroom_sidecar.agent.executor.speculative.draft import (NGRAM_MAX, NGRAM_MIN, DraftModules,
                                                               Drafter, PromptLookupDrafter,
                                                               RecordingLog, SelfDrafter)
from headroom_sidecar.agent.executor.speculative.generate import SpecStats, speculative_generate
from headroom_sidecar.agent.executor.speculative import perrequest
from headroom_sidecar.agent.executor.speculative.model_io import SpeculationUnsupported
from headroom_sidecar.agent.executor.speculative.verify import Sampler
from headroom_sidecar.proto.plandoc import SpeculativeDraft

_MAX_ERRORS_KEPT = 8
# generate() arguments by which the caller chose a decoding loop of its own (classes.py too).
CALLER_LOOPS = ("assistant_model", "prompt_lookup_num_tokens", "streamer")
# ... and custom_generate: such calls are passed through as is.
_OTHER_LOOPS = ("custom_generate",) + CALLER_LOOPS


@dataclass(frozen=True)
class SpeculativeSettings:
    # Prompt lookup: the longest and shortest n-gram of the sequence's tail searched for
    # (defaults and why: draft.py NGRAM_MAX, NGRAM_MIN).
    ngram_max: int = field(default=NGRAM_MAX, metadata={"env": "HEADROOM_SPEC_NGRAM_MAX"})
    ngram_min: int = field(default=NGRAM_MIN, metadata={"env": "HEADROOM_SPEC_NGRAM_MIN"})

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError(f"speculative settings ngram_min={self.ngram_min}, ngram_max="
                             f"{self.ngram_max}: need 1 <= ngram_min <= ngram_max <= 16")

    @classmethod
    def resolve(cls, **overrides: Any) -> "SpeculativeSettings":
        from headroom_sidecar.agent.settings import resolve_settings
        return resolve_settings(cls, overrides, "speculative")


class InstanceAttrs:
    """An object's own attributes (its __dict__), for the undo log: a name absent from the
    instance reads as absent here even when the class defines it (as `generate`), so undoing
    a set removes the instance attribute instead of pinning the class's bound method."""

    def __init__(self, obj: Any):
        object.__setattr__(self, "_obj", obj)

    def __getattr__(self, name: str) -> Any:
        try:
            return vars(self._obj)[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        vars(self._obj)[name] = value

    def __delattr__(self, name: str) -> None:
        del vars(self._obj)[name]


def build_draft(ex: Any, transforms: tuple) -> DraftModules:
    """Applies a draft plan's transforms (already in APPLY_ORDER) with the executor's own
    appliers, into a log of their own; the model is the verifier again when this returns."""
    device = next(ex.model.parameters()).device
    log = RecordingLog(device)                  # the verifier's modules never leave the device
    try:
        for t in transforms:
            ex.appliers[t.kind](ex, t, log)
    except BaseException:
        log.undo()
        raise
    return DraftModules(ex.model, log)


def make_drafter(model: nn.Module, spec: Any, draft_builder: Callable[[tuple], DraftModules],
                 settings: Optional[SpeculativeSettings] = None
                 ) -> tuple[Drafter, Optional[threading.Lock], str]:
    """spec: agent.plan.Speculative -> (drafter, the lock its requests need or None, a note).
    A self draft is built now (its modules swapped out again when this returns)."""
    settings = settings or SpeculativeSettings.resolve()
    if spec.draft == SpeculativeDraft.PROMPT_LOOKUP:
        return (PromptLookupDrafter(settings.ngram_max, settings.ngram_min), None,
                f"n-grams {settings.ngram_min}-{settings.ngram_max} of the sequence")
    modules = draft_builder(spec.draft_transforms)
    return (SelfDrafter(model, modules), threading.Lock(),
            f"the model under a {len(spec.draft_transforms)}-transform draft plan "
            f"({modules.extra_bytes / 2**20:.1f} MiB of draft-only weights)")


def install_speculative(model: nn.Module, spec: Any, log: UndoLog,
                        draft_builder: Callable[[tuple], DraftModules],
                        settings: Optional[SpeculativeSettings] = None) -> list[str]:
    """spec: agent.plan.Speculative. Returns the apply notes."""
    drafter, lock, note = make_drafter(model, spec, draft_builder, settings)
    wrapper = SpeculativeGenerate(model.generate, drafter, spec.k, lock)
    log.set_attr(InstanceAttrs(model), "generate", wrapper)
    return [f"execution: speculative decoding, k={spec.k}, drafts by {note}; greedy output "
            "is the verifier's own"]


def installed(model: nn.Module) -> Optional["SpeculativeGenerate"]:
    g = vars(model).get("generate")
    return g if isinstance(g, SpeculativeGenerate) else None


class SpeculativeGenerate:
    def __init__(self, inner: Callable, drafter: Drafter, k: int,
                 lock: Optional[threading.Lock] = None):
        self.inner, self.drafter, self.k, self.lock = inner, drafter, k, lock
        self.totals = SpecStats()
        self.last: Optional[SpecStats] = None
        self.fallbacks: dict[str, int] = {}       # why a request ran the plain loop -> count
        self.errors: list[str] = []               # the last few errors inside the loop

    def __call__(self, *args: Any, **kwargs: Any):
        if any(kwargs.get(name) is not None for name in _OTHER_LOOPS):
            return self.inner(*args, **kwargs)
        return self.inner(*args, custom_generate=self._loop, **kwargs)

    def _loop(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
              synced_gpus=False, streamer=None, **model_kwargs):
        """transformers' decoding-loop signature (GenerationMixin._sample)."""
        args = (model, input_ids, logits_processor, stopping_criteria, generation_config,
                synced_gpus, streamer, model_kwargs)
        why = _ineligible(input_ids, generation_config, synced_gpus, streamer, model_kwargs)
        if why is None:
            try:
                return self._speculate(*args[:5])
            except SpeculationUnsupported as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001 - the request must still be served
                why = "error"
                self.errors = (self.errors + [f"{type(e).__name__}: {e}"[:300]])[-_MAX_ERRORS_KEPT:]
        self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
        return _plain(*args)

    def _speculate(self, model, input_ids: Tensor, logits_processor, stopping_criteria,
                   generation_config) -> Tensor:
        budget = int(generation_config.max_length) - input_ids.shape[1]
        if budget < 1:
            return input_ids
        sampler = Sampler(logits_processor, bool(generation_config.do_sample))
        stop = lambda seq: bool(stopping_criteria(seq, None).any())     # noqa: E731
        if isinstance(self.drafter, SelfDrafter):
            self.drafter.temperature = float(generation_config.temperature or 1.0)
        with self.lock if self.lock is not None else _nothing():
            tokens, stats = speculative_generate(model, input_ids, budget, self.drafter, self.k,
                                                 sampler=sampler, stop=stop)
        self.last = stats
        self.totals.add(stats)
        perrequest.note(stats)
        return torch.cat([input_ids, tokens.view(1, -1)], dim=1)       # [1, T + N]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _ineligible(input_ids: Tensor, config, synced_gpus, streamer, model_kwargs) -> Optional[str]:
    from transformers.generation.utils import GenerationMode
    if config.get_generation_mode() not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {config.get_generation_mode().value}"     # (beams widen the batch)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        return "batch size is not 1"
    if streamer is not None or synced_gpus or config.return_dict_in_generate:
        return "streamer, synced GPUs or dict output"
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "padded input"
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        return "a filled cache was given"
    pos = model_kwargs.get("position_ids")
    if pos is not None and not torch.equal(pos.flatten().cpu(), torch.arange(pos.numel())):
        return "position ids given"
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in
                   ("attention_mask", "cache", "past_key_values", "use_cache", "position_ids",
                    "logits_to_keep"))
    return f"model inputs {extra}" if extra else None


def _plain(model, input_ids, logits_processor, stopping_criteria, generation_config,
           synced_gpus, streamer, model_kwargs):
    """transformers' own loop for this request's mode, with the inputs it prepared."""
    from transformers.generation.utils import GENERATION_MODES_MAPPING
    method = getattr(type(model), GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
    return method(model, input_ids, logits_processor=logits_processor,
                  stopping_criteria=stopping_criteria, generation_config=generation_config,
                  synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
