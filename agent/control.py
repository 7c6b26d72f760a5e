"""The agent's side of the closed loop: ApplyPlan, TrialRequest and Rollback from the control
plane, answered with PlanStatusReport and TrialResultReport.

`ControlHandler.handle` is the exporter's on_control: it runs on the exporter's control thread,
one command at a time, in order. Parsing, validation, tokenising and replies happen outside the
request boundary; only model work (apply, rollback, trial) holds it (observe/requests.py), so a
plan changes the model between two requests and never inside one. Nothing here raises into the
model or the exporter: every failure becomes a reply (and a log line).

While a plan is active: cheap request metrics go on; full traces are paused (the adapter's
structure points at the modules the plan swapped out; counted in the tracker's
`traces_paused_skipped`) and resume on rollback; the live quality guard (guard.py) re-checks
served requests. The model fingerprint stays the unoptimised model's.

PlanStatusReport.detail is JSON:
- APPLIED: the ApplyReport's fields; "already_active": true when that very plan was active.
- REFUSED: {"problems": [...]} (every reason; no weight was touched).
- FAILED: {"error": "..."} (apply is atomic: the model is left unoptimised).
- ROLLED_BACK: {"cause": Cause, ...}; "replaced" (by "by"), "control_plane" ("reason",
  "was_active": false when the plan named was not the active one), "quality_guard" ("top1",
  "threshold", "request_id"), "trial" (a trial could not re-apply it), "detach".

eval_json of a TrialRequest: proto/evalset.py (EvalSpec parses and validates it).
Token ids win over texts (controlplane/evalsets.py sends either): held-out sequences are
token_sequences, else up to max_sequences seq_len-token chunks of the texts; prompts are
token_prompts, else prompt strings, else `prompts` chunks cut from the texts after the
sequences, else the first prompt_tokens of the first `prompts` token_sequences. Texts and
prompt strings need the tokenizer given to attach(). At least one sequence (>= 2 tokens) and
one prompt are required.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from headroom_sidecar.agent import wire
from headroom_sidecar.agent.adapters.base import ModelStructure
from headroom_sidecar.agent.executor import ApplyReport, Executor
from headroom_sidecar.agent.executor.speculative import classcontrol
from headroom_sidecar.agent.executor.speculative.classes import ClassPlans
from headroom_sidecar.agent.guard import GuardResult, QualityGuard
from headroom_sidecar.agent.observe.requests import RequestTracker, WorkSite
from headroom_sidecar.proto.plan import Plan, PlanError
from headroom_sidecar.agent.settings import AgentSettings
from headroom_sidecar.agent.trial import (Baseline, EvalSet, Evidence, logit_width, prompt_ids,
                         trial_with_baseline)
from headroom_sidecar.agent.verify import PlanVerifier
from headroom_sidecar.proto.evalset import EvalSpec, EvalSpecError
from headroom_sidecar.proto.plandoc import PlanPurpose

log = logging.getLogger("headroom.control")

BIND_TIMEOUT_S = 30.0      # a command arriving while attach() is still wiring up waits this long
HISTORY_MAX = 256          # replies kept on the handle for inspection


class Cause(str, enum.Enum):
    """Why a plan stopped serving (ROLLED_BACK detail "cause")."""
    CONTROL_PLANE = "control_plane"
    REPLACED = "replaced"
    QUALITY_GUARD = "quality_guard"
    TRIAL = "trial"
    DETACH = "detach"
    LOCAL = "local"


class Origin(str, enum.Enum):
    """Who asked for a plan (APPLIED / REFUSED detail "origin")."""
    CONTROL_PLANE = "control_plane"   # from the network: signed, checked by agent/verify.py
    LOCAL = "local"                   # handle.apply_plan by the process owner: not signed


# ---------------------------------------------------------------------------- eval sets
# The eval_json contract (EvalSpec, EvalSpecError) is proto/evalset.py's: one parser for
# both sides. What it means for this model (tokenizer, vocabulary) is checked here.


def vocab_size(model: nn.Module) -> Optional[int]:
    """The model's logit width (trial.logit_width); None when unknown."""
    return logit_width(model) or None


def build_evalset(spec: EvalSpec, tokenizer, vocab: Optional[int]) -> EvalSet:
    """The EvalSet a spec describes (token ids win over texts); EvalSpecError otherwise."""
    seqs = [torch.tensor(s) for s in spec.token_sequences]
    prompts = [torch.tensor(p) for p in spec.token_prompts]
    text_prompts = isinstance(spec.prompts, tuple) and bool(spec.prompts)
    need_texts = bool(spec.texts) and (not seqs or (not prompts and not text_prompts))
    if (need_texts or (text_prompts and not prompts)) and tokenizer is None:
        raise EvalSpecError(["texts / prompt strings need a tokenizer: attach(model, tokenizer=...)"])
    if need_texts or (text_prompts and not prompts and spec.texts):
        try:
            ev = EvalSet.from_texts(tokenizer, spec.texts, spec.seq_len,
                                    0 if prompts else spec.prompts, spec.new_tokens,
                                    spec.max_sequences, spec.prompt_tokens)
        except ValueError as e:
            raise EvalSpecError([f"texts: {e}"]) from e
        seqs, prompts = seqs or ev.sequences, prompts or ev.prompts
    elif text_prompts and not prompts:
        prompts = [prompt_ids(tokenizer, p) for p in spec.prompts]
    if not prompts and isinstance(spec.prompts, int):
        prompts = [s[:spec.prompt_tokens] for s in seqs[:spec.prompts]]
    problems = _check_ids(seqs, "sequences", vocab, 2) + _check_ids(prompts, "prompts", vocab, 1)
    if not seqs:
        problems.append("no held-out sequences: give token_sequences or texts")
    if not prompts:
        problems.append("no prompts: give token_prompts, prompt strings, or prompts > 0")
    if problems:
        raise EvalSpecError(problems)
    return EvalSet(sequences=seqs, prompts=prompts, new_tokens=spec.new_tokens)


def _check_ids(ts: list[torch.Tensor], where: str, vocab: Optional[int], min_len: int) -> list[str]:
    problems = []
    for i, t in enumerate(ts):
        if len(t) < min_len:
            problems.append(f"{where}[{i}]: {len(t)} token(s), needs at least {min_len}")
        elif vocab is not None and int(t.max()) >= vocab:
            problems.append(f"{where}[{i}]: token id {int(t.max())} out of range (model vocab {vocab})")
    return problems


def evalset_hash(ev: EvalSet, latency_repeats: int) -> str:
    """Identity of an eval set's token ids and settings: the baseline cache's key."""
    h = hashlib.sha256(f"{ev.new_tokens}|{latency_repeats}|{len(ev.sequences)}|".encode())
    for t in list(ev.sequences) + ["|"] + list(ev.prompts):
        h.update(b"|" if isinstance(t, str) else
                 f"{len(t)}:".encode() + t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- plans
class UnverifiedPlanError(PlanError):
    """Unsigned, signed by an untrusted key, a bad signature, or a hash that does not match."""


def parse_plan(msg: wire.PlanMessage, verifier: Optional[PlanVerifier] = None,
               purpose: PlanPurpose = PlanPurpose.APPLY) -> Plan:
    """The plan a message carries; PlanError if the document, its hash or its id disagree.
    With a verifier (every plan from the network) the signature for `purpose` and the hash of
    the document bytes are checked first, before the document is even parsed."""
    if verifier is not None:
        unverified = verifier.check(msg, purpose)
        if unverified:
            raise UnverifiedPlanError(unverified, msg.plan_id[:200])
    plan = Plan.from_json(msg.document_json)
    problems = []
    if not msg.sha256:
        problems.append("sha256: the message carries none")
    elif msg.sha256 != plan.hash:
        problems.append(f"sha256: the message says {msg.sha256[:12]}…, the document hashes to "
                        f"{plan.hash[:12]}… (altered in transit, or another canonical form)")
    if msg.plan_id and msg.plan_id != plan.plan_id:
        problems.append(f"plan_id: the message says {msg.plan_id!r}, the document {plan.plan_id!r}")
    if msg.version and msg.version != plan.version:
        problems.append(f"version: the message says {msg.version}, the document {plan.version}")
    if problems:
        raise PlanError(problems, plan.plan_id)
    return plan


def as_plan(plan: Plan | Mapping[str, Any] | str | bytes) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_doc(dict(plan))
    return Plan.from_json(plan)


def plan_message(plan: Plan | Mapping[str, Any] | str | bytes) -> wire.PlanMessage:
    p = as_plan(plan)
    return wire.PlanMessage(p.plan_id, p.version, p.to_json(), p.hash)


# ---------------------------------------------------------------------------- the handler
@dataclass
class ControlStats:
    commands: int = 0
    applied: int = 0
    refused: int = 0
    failed: int = 0
    rolled_back: int = 0
    trials: int = 0
    trial_errors: int = 0
    baseline_cache_hits: int = 0
    unverified: int = 0      # plans refused for their signature or hash (also in `refused`)
    errors: int = 0          # exceptions caught outside the expected paths (bugs); logged


@dataclass
class ApplyOutcome:
    reports: list[wire.PlanStatusReport]
    report: Optional[ApplyReport] = None
    error: Optional[Exception] = None


def _detail(d: Mapping[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


class ControlHandler:
    """See the module docstring. bind() must be called (attach does) before commands run."""

    def __init__(self, model: nn.Module, structure: ModelStructure, executor: Executor,
                 settings: AgentSettings, *, tokenizer=None):
        self.model, self.structure, self.executor = model, structure, executor
        self.settings, self.tokenizer = settings, tokenizer
        self.stats = ControlStats()
        self.history: collections.deque = collections.deque(maxlen=HISTORY_MAX)
        self.guard: Optional[QualityGuard] = None
        self._tracker: Optional[RequestTracker] = None
        self._send = None
        self._bound = threading.Event()
        self._closed = False
        self._last_apply: Optional[ApplyReport] = None
        self._baselines: "collections.OrderedDict[tuple, Baseline]" = collections.OrderedDict()
        self.verifier = PlanVerifier.from_spec(settings.plan_verify_keys)
        # Plans scoped to query classes: speculation only, beside the default (classes.py).
        self.classes = ClassPlans(model, executor)

    def bind(self, tracker: RequestTracker, send) -> None:
        """Wires the request boundaries, the guard and the reply channel (send(Reply))."""
        self._tracker, self._send = tracker, send
        self.classes.current_class = tracker.current_query_class
        self.guard = QualityGuard(self.model, self.executor, self.settings, tracker.boundary,
                                  self._guard_breach)
        tracker.on_finished = self.guard.on_request_finished
        self._bound.set()

    # ------------------------------------------------------------ exporter thread entry
    def handle(self, command: wire.ControlCommand) -> None:
        """on_control: runs the command and sends its replies; never raises."""
        self.stats.commands += 1
        try:
            if not self._bound.wait(BIND_TIMEOUT_S):
                raise RuntimeError("control handler was never bound to a request tracker")
            for reply in self._run(command):
                self.reply(reply)
        except Exception:  # noqa: BLE001 - the model keeps serving whatever happens
            self.stats.errors += 1
            log.exception("headroom control: %s failed", type(command).__name__)

    def _run(self, command: wire.ControlCommand) -> list[wire.Reply]:
        if self._closed:
            raise RuntimeError(f"agent detached; {type(command).__name__} ignored")
        if isinstance(command, wire.TrialRequest):
            return [self.trial(command)]
        if isinstance(command, wire.ApplyPlan):
            return list(self.apply(command.plan).reports)
        if isinstance(command, wire.Rollback):
            return [self.rollback(command.plan_id, command.reason, Cause.CONTROL_PLANE)]
        raise TypeError(f"unknown control command {type(command).__name__}")

    def reply(self, reply: wire.Reply) -> None:
        self.history.append(reply)
        try:
            if self._send is not None:
                self._send(reply)
        except Exception:  # noqa: BLE001
            self.stats.errors += 1
            log.exception("headroom control: sending %s failed", type(reply).__name__)

    # ------------------------------------------------------------ apply
    def apply(self, msg: wire.PlanMessage, origin: Origin = Origin.CONTROL_PLANE) -> ApplyOutcome:
        """A plan from the control plane is verified (signature, hash) before anything else;
        only the process owner's own plans (apply_local, Origin.LOCAL) skip the signature."""
        verifier = self.verifier if origin is Origin.CONTROL_PLANE else None
        try:
            plan = parse_plan(msg, verifier, PlanPurpose.APPLY)
            self.executor.validate(plan)      # outside the boundary: reads the structure only
            refused = classcontrol.refusal(self.classes, plan)
            if refused is not None:
                raise refused
        except PlanError as e:
            self.stats.refused += 1
            self.stats.unverified += isinstance(e, UnverifiedPlanError)
            return ApplyOutcome([wire.PlanStatusReport(
                msg.plan_id[:200], msg.sha256[:64], wire.PlanState.REFUSED,
                _detail({"problems": e.problems, "origin": origin.value,
                         **classcontrol.scope_detail(e)}))], error=e)
        provenance = {"origin": origin.value, **({"key_id": msg.key_id} if verifier else {})}
        with self._tracker.boundary():
            if plan.query_classes:
                return self._apply_class(plan, provenance)
            return self._apply_at_boundary(plan, provenance)

    def _apply_class(self, plan: Plan, provenance: Mapping[str, str]) -> ApplyOutcome:
        try:
            reports, report, error = classcontrol.apply_class(self.classes, plan, self._status,
                                                              provenance)
        finally:
            self._sync()
        self.stats.applied += report is not None
        self.stats.refused += isinstance(error, PlanError)
        self.stats.failed += error is not None and not isinstance(error, PlanError)
        return ApplyOutcome(reports, report, error)

    def _apply_at_boundary(self, plan: Plan, provenance: Mapping[str, str]) -> ApplyOutcome:
        """provenance: {"origin": Origin, "key_id": the signing key}, in the APPLIED detail."""
        active = self.executor.active_plan
        if active is not None and active.hash == plan.hash and self._last_apply is not None:
            detail = {**dataclasses.asdict(self._last_apply), **provenance, "already_active": True}
            return ApplyOutcome([self._status(plan, wire.PlanState.APPLIED, detail)], self._last_apply)
        reports = []
        if active is not None:
            reports.append(self._rollback_at_boundary(active, {"cause": Cause.REPLACED.value,
                                                               "by": plan.plan_id}))
        try:
            report = self.executor.apply(plan)
        except Exception as e:  # noqa: BLE001 - TransformError etc.: apply restored the model
            self.stats.failed += 1
            reports.append(self._status(plan, wire.PlanState.FAILED,
                                        {"error": f"{type(e).__name__}: {e}"}))
            return ApplyOutcome(reports, error=e)
        finally:
            self._sync()
        self.stats.applied += 1
        self._last_apply = report
        reports.append(self._status(plan, wire.PlanState.APPLIED,
                                    {**dataclasses.asdict(report), **provenance}))
        return ApplyOutcome(reports, report)

    def apply_local(self, plan: Plan | Mapping[str, Any] | str | bytes) -> ApplyReport:
        """apply() for a plan given in process; reports go to the control plane as well.
        Raises PlanError (refused) or the apply's error (model left unoptimised)."""
        outcome = self.apply(plan_message(plan), Origin.LOCAL)
        for r in outcome.reports:
            self.reply(r)
        if outcome.error is not None:
            raise outcome.error
        return outcome.report

    # ------------------------------------------------------------ rollback
    def rollback(self, plan_id: str = "", reason: str = "", cause: Cause = Cause.LOCAL
                 ) -> wire.PlanStatusReport:
        """Rolls back the active plan (if `plan_id` is given, only if it is that plan)."""
        with self._tracker.boundary():
            active = self.executor.active_plan
            scoped = self.classes.classes_of(plan_id) if plan_id else []
            if scoped and (active is None or active.plan_id != plan_id):
                return self._rollback_classes(scoped, {"cause": cause.value, "reason": reason,
                                                       "was_active": True})[0]
            if active is None or (plan_id and active.plan_id != plan_id):
                return wire.PlanStatusReport(plan_id, "", wire.PlanState.ROLLED_BACK, _detail(
                    {"cause": cause.value, "reason": reason, "was_active": False,
                     "active_plan": active.plan_id if active else None}))
            return self._rollback_at_boundary(active, {"cause": cause.value, "reason": reason,
                                                       "was_active": True})

    def rollback_class(self, query_class: str, reason: str = "", cause: Cause = Cause.LOCAL
                       ) -> list[wire.PlanStatusReport]:
        """Rolls back the plan of one query class (its requests run the default again)."""
        with self._tracker.boundary():
            return self._rollback_classes([query_class], {"cause": cause.value, "reason": reason})

    def _rollback_classes(self, classes: list[str], detail: dict) -> list[wire.PlanStatusReport]:
        try:
            reports = classcontrol.rollback_classes(self.classes, classes, self._status, detail)
        finally:
            self._sync()
        self.stats.rolled_back += len(reports)
        return reports or [wire.PlanStatusReport("", "", wire.PlanState.ROLLED_BACK, _detail(
            {**detail, "query_classes": classes, "was_active": False}))]

    def _rollback_at_boundary(self, plan: Plan, detail: dict) -> wire.PlanStatusReport:
        try:
            self.executor.rollback()
        except Exception as e:  # noqa: BLE001
            self.stats.failed += 1
            return self._status(plan, wire.PlanState.FAILED,
                                {**detail, "error": f"rollback failed: {type(e).__name__}: {e}"})
        finally:
            self._sync()
        self.stats.rolled_back += 1
        return self._status(plan, wire.PlanState.ROLLED_BACK, detail)

    def _guard_breach(self, plan: Plan, result: GuardResult) -> None:
        """Called by the guard while it holds the boundary."""
        if self.executor.active_plan is plan:
            self.reply(self._rollback_at_boundary(plan, {
                "cause": Cause.QUALITY_GUARD.value, "top1": result.top1,
                "threshold": result.threshold, "request_id": result.request_id}))

    def _sync(self) -> None:
        """Traces, token capture and the guard follow whichever plan is active now."""
        plan = self.executor.active_plan
        self._sync_classes(plan)
        self._tracker.capture_ids = plan is not None
        # A class's self draft swaps modules in the middle of requests: no traces either.
        self._tracker.traces_paused = plan is not None or bool(self.classes)
        if self.guard is not None:
            self.guard.watch(plan)

    def _sync_classes(self, default: Optional[Plan]) -> None:
        """Class plans checked against another default are dropped (reported); a draft that
        can no longer be built drops every class plan rather than serve a stale one."""
        by = {"cause": Cause.REPLACED.value, "reason": "the default plan changed",
              "default_plan": default.plan_id if default else None}
        try:
            dropped = self.classes.sync()
        except Exception as e:  # noqa: BLE001
            self.stats.errors += 1
            by["reason"], dropped = f"draft rebuild failed: {type(e).__name__}: {e}", self.classes.close()
        for r in classcontrol.rolled_back_reports(dropped, self._status, by):
            self.stats.rolled_back += 1
            self.reply(r)

    def _status(self, plan: Plan, state: int, detail: Mapping[str, Any]) -> wire.PlanStatusReport:
        return wire.PlanStatusReport(plan.plan_id, plan.hash, state, _detail(detail))

    # ------------------------------------------------------------ trials
    def trial(self, cmd: wire.TrialRequest) -> wire.TrialResultReport:
        self.stats.trials += 1
        try:
            plan = parse_plan(cmd.plan, self.verifier, PlanPurpose.TRIAL)   # signed for trials
            evidence = self.run_spec_trial(plan, EvalSpec.from_json(cmd.eval_json))
            return wire.TrialResultReport(cmd.trial_id, evidence_json=evidence.to_json())
        except Exception as e:  # noqa: BLE001 - PlanError, EvalSpecError, model errors: all replied
            self.stats.trial_errors += 1
            if not isinstance(e, (PlanError, EvalSpecError)):
                log.warning("headroom control: trial %s failed", cmd.trial_id, exc_info=True)
            msg = str(e) if isinstance(e, (PlanError, EvalSpecError)) else f"{type(e).__name__}: {e}"
            return wire.TrialResultReport(cmd.trial_id, error=msg)

    def run_spec_trial(self, plan: Plan, spec: EvalSpec) -> Evidence:
        """A trial on an eval_json spec: its eval set, with the recent prompts of the plan's
        query classes in place of its prompts when the spec asks for traffic_prompts."""
        ev = build_evalset(spec, self.tokenizer, vocab_size(self.model))
        ev, source = self._traffic_prompts(ev, spec.traffic_prompts, plan.query_classes)
        evidence = self.run_trial(plan, ev, spec.latency_repeats)
        evidence.notes += [source] if source else []
        return evidence

    def _traffic_prompts(self, ev: EvalSet, n: int, classes: Sequence[str]) -> tuple[EvalSet, str]:
        """ev with up to n of the classes' recent prompts as its prompts (observe/prompts.py),
        and what the evidence should say about where the prompts came from ("": not asked)."""
        if n <= 0:
            return ev, ""
        recent = self._tracker.recent_prompts.newest(classes, n) if classes else []
        where = f"query class(es) {', '.join(classes)}" if classes else "a plan without query classes"
        if not recent:
            return ev, (f"prompts: the eval set's {len(ev.prompts)} (no recent prompt of {where} "
                        f"in this agent's memory)")
        return (dataclasses.replace(ev, prompts=recent),
                f"prompts: the {len(recent)} most recent of {where} served by this agent")

    def run_trial(self, plan: Plan | Mapping[str, Any] | str | bytes, ev: EvalSet,
                  latency_repeats: int = 3) -> Evidence:
        """One trial between two requests, on a thread that serves them (the tracker hands it
        to the next request, or to an idle loop in serve_pending(); after trial_handoff_s with
        neither, this thread runs it and the evidence says so). Reuses the quality baseline of
        an earlier trial on the same eval set while the same plan (or none) is active."""
        plan = as_plan(plan)
        ev_hash = evalset_hash(ev, latency_repeats)
        run = lambda: self._trial_at_boundary(plan, ev, ev_hash, latency_repeats)
        (evidence, cached), site = self._tracker.run_model_work(
            run, handoff_s=self.settings.trial_handoff_s)
        evidence.timed_on = f"{evidence.timed_on} ({site.value})"
        if site is not WorkSite.SERVING_THREAD:
            evidence.notes.append(f"timed on the control thread: no serving thread took the trial "
                                  f"within {self.settings.trial_handoff_s:g} s; on a CPU its "
                                  f"figures may differ from what requests get")
        if cached:
            self.stats.baseline_cache_hits += 1
            evidence.notes.append("baseline quality: reused from an earlier trial on the same "
                                  "eval set (latency is timed afresh, interleaved)")
        return evidence

    def _trial_at_boundary(self, plan: Plan, ev: EvalSet, ev_hash: str,
                           latency_repeats: int) -> tuple[Evidence, bool]:
        before = self.executor.active_plan
        key = (ev_hash, before.hash if before is not None else None)
        cached = self._baselines.get(key)
        try:
            evidence, base = trial_with_baseline(self.model, self.structure, self.executor, plan,
                                                 ev, latency_repeats=latency_repeats,
                                                 baseline=cached)
        finally:
            self._after_trial(before)
        self._remember(key, base)
        return evidence, cached is not None

    def _after_trial(self, before: Optional[Plan]) -> None:
        if before is not None and self.executor.active_plan is not before:
            self.reply(self._status(before, wire.PlanState.ROLLED_BACK, {
                "cause": Cause.TRIAL.value, "reason": "the trial could not re-apply it"}))
        self._sync()

    def _remember(self, key: tuple, base: Baseline) -> None:
        limit = self.settings.trial_baseline_cache_entries
        self._baselines[key] = base
        self._baselines.move_to_end(key)
        while len(self._baselines) > limit:
            self._baselines.popitem(last=False)

    # ------------------------------------------------------------ detach
    def close(self) -> None:
        """Stops the guard and rolls back an active plan (detach leaves the model as it was)."""
        self._closed = True
        if self.guard is not None:
            self.guard.close()
        if self._tracker is None:
            return
        with self._tracker.boundary():
            for r in self._rollback_classes(sorted(self.classes.routes), {"cause": Cause.DETACH.value}):
                if r.plan_id:
                    self.reply(r)
            active = self.executor.active_plan
            if active is not None:
                self.reply(self._rollback_at_boundary(active, {"cause": Cause.DETACH.value}))
