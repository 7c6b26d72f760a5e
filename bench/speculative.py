"""Speculative decoding on SmolLM2-135M (CPU): tokens/s against the unoptimised model, with
the output checked to be the unoptimised model's own.

Rows (all greedy, the same prompts, `--new-tokens` forced per prompt):
- unoptimised: plain generate();
- HF prompt lookup: generate(prompt_lookup_num_tokens=k) on the unoptimised model;
- HF assisted generation with a separate small draft model: no smaller model of SmolLM2's
  vocabulary can be downloaded here, so the draft is built offline from SmolLM2 itself: a
  separate LlamaForCausalLM holding copies of its first --draft-layers blocks, final norm and
  head (`generate(assistant_model=draft)`, HF's own schedule of draft lengths);
- headroom prompt lookup: plan {"kind": "execution", "speculative": {"draft": "prompt_lookup"}};
- headroom self-speculative: draft = the same model under int8 on every block + the
  --skip-layers blocks with the smallest residual update (calibration text, bench/table.py's
  rule), verifier = the unoptimised model;
- headroom fp32_packed: plan {"kind": "weight_precision", "layers": every block and lm_head:
  "fp32_packed"}: the same fp32 weights in the layout of the fp32 GEMM timed fastest here, no
  speculation; then the prompt lookup and self-speculative rows again "over fp32_packed": the
  verifier is that plan (what the per-class planner does over an approved default plan).
Rounds are interleaved (every row once per round, all prompts); a row's ratio per round is its
tokens/s over the unoptimised row's in that round. Exact = the fraction of prompts whose tokens
equal the unoptimised greedy tokens (so a row over fp32_packed is checked against the
unoptimised model too, not only against its own verifier). Weight memory: the model's weights
under the row's plan (a packed lm_head is a second copy of the tied embedding) plus the
draft's own (its int8 copies; skipped layers share the verifier's tensors).

Per class (--prompts classes): the demo's mixed workload (workloads/prompts.py: factual, code,
creative, arithmetic, and grounded), each class measured on its own prompts with every row,
then the choice the per-class planner makes (controlplane/planner/speculation.py's own search,
each trial answered by the row measured here), once over the unoptimised model and once over
fp32_packed as the default plan, and the mix's tokens/s with each class on its choice.

    .venv/bin/python bench/speculative.py [--rounds 4] [--new-tokens 64] [--k 4] [--prompts grounded]
    .venv/bin/python bench/speculative.py --prompts classes [--per-class 2] [--ks 3,6,12]
    smallest: --prompts classes --per-class 1 --rounds 1 --new-tokens 8 --ks 4 --skip-layers 0
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.adapters import resolve_structure  # noqa: E402
from headroom_sidecar.agent.executor import Executor, weight_bytes  # noqa: E402
from headroom_sidecar.agent.fingerprint import fingerprint  # noqa: E402
from headroom_sidecar.proto.plan import Plan  # noqa: E402
from headroom_sidecar.agent.executor.speculative.generate import SpecStats  # noqa: E402
from headroom_sidecar.agent.executor.speculative.install import installed  # noqa: E402
from bench.table import calibrate, fp32_packed_transform, plan_doc, token_chunks  # noqa: E402
from headroom_sidecar.controlplane.planner.search import TrialError  # noqa: E402
from headroom_sidecar.controlplane.planner.speculation import (K_CHOICES, SpeculationSearch,  # noqa: E402
                                                               speculative_of)
from workloads.prompts import GROUNDED_PROMPTS, PROMPTS, QueryClass, chat_ids  # noqa: E402
from workloads.smollm2 import load_smollm2  # noqa: E402
from headroom_sidecar.controlplane.evaltexts import Split  # noqa: E402

NO_DRAFT_MODEL = ("HF assisted: the draft is SmolLM2's first blocks as a separate model (no "
                  "trained smaller model of its vocabulary can be downloaded here)")


@dataclass
class Row:
    name: str
    plan: Optional[dict] = None                  # a headroom plan applied around each run
    generate_kwargs: dict = field(default_factory=dict)
    tok_s: list[float] = field(default_factory=list)        # one per round
    ratio: list[float] = field(default_factory=list)        # / unoptimised, one per round
    exact: list[bool] = field(default_factory=list)         # one per prompt per round
    stats: SpecStats = field(default_factory=SpecStats)
    draft_bytes: int = 0
    weight_bytes: int = 0                        # the model's weights under `plan`
    over_packed: bool = False                    # the verifier is the fp32_packed plan


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int, **kw) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, **kw)
    return out[0, ids.shape[1]:]                                          # [n]


def run_row(row: Row, model, ex: Executor, prompts, refs, n: int) -> float:
    """One round of `row` over every prompt; returns its tokens/s."""
    if row.plan is not None:
        report = ex.apply(Plan.from_doc(row.plan))
        row.draft_bytes = max(row.draft_bytes, _draft_bytes(report.notes))
        row.weight_bytes = report.weight_bytes_after
    try:
        t0, outs = time.perf_counter(), []
        for ids in prompts:
            outs.append(greedy(model, ids, n, **row.generate_kwargs))
        dt = time.perf_counter() - t0
        g = installed(model)
        if g is not None:
            row.stats.add(g.totals)
    finally:
        if row.plan is not None:
            ex.rollback()
    if refs is not None:
        row.exact += [bool(torch.equal(o, r)) for o, r in zip(outs, refs)]
    return len(prompts) * n / dt


def _draft_bytes(notes: list[str]) -> int:
    for note in notes:
        if "MiB of draft-only weights" in note:
            return int(float(note.split("(")[-1].split(" MiB")[0]) * 2**20)
    return 0


def least_update_layers(model, s, tok, skip: int) -> list[int]:
    stats = calibrate(model, s, token_chunks(tok, Split.CALIBRATION, 4, 128))
    inner = range(1, s.num_layers - 1)                 # first and last blocks are kept
    return sorted(sorted(inner, key=lambda i: stats["update"][i])[:skip])


def _execution(spec: dict) -> dict:
    return {"kind": "execution", "static_kv_cache": False, "compile": "none", "speculative": spec}


def _draft(s, skipped: list[int]) -> list[dict]:
    draft = [{"kind": "weight_precision", "layers": {str(i): "int8" for i in range(s.num_layers)}}]
    if skipped:
        draft.append({"kind": "skip_layers", "layers": skipped})
    return draft


def headroom_rows(fp: str, s, ks: list[int], skipped: list[int], base: tuple = ()) -> list[Row]:
    """The per-class planner's candidates over the default plan `base` (its transforms; the
    verifier): prompt lookup and self draft, each k."""
    tag, pid = (" over fp32_packed", "-packed") if base else ("", "")
    rows = [Row(f"headroom prompt lookup k={k}{tag}", over_packed=bool(base), plan=plan_doc(
        fp, f"bench-spec-lookup-{k}{pid}", [*base, _execution({"draft": "prompt_lookup", "k": k})],
        "bench/speculative.py")) for k in ks]
    return rows + [Row(f"headroom self-spec k={k}{tag} (draft int8 + skip {skipped})",
                       over_packed=bool(base), plan=plan_doc(
        fp, f"bench-spec-self-{k}{pid}", [*base, _execution({"draft": "self", "k": k, "draft_plan": {
            "transforms": _draft(s, skipped)}})], "bench/speculative.py")) for k in ks]


def truncated_draft(model, n_layers: int):
    """A separate, smaller model of the same vocabulary: copies of the first n_layers blocks,
    the final norm and the head in a new instance of the model's class."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    draft = type(model)(cfg).to(model.dtype).eval()
    missing, _beyond = draft.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"the draft lacks weights for {missing[:3]}")
    return draft


def build_rows(fp: str, s, k: int, skipped: list[int], ks: Optional[list[int]] = None,
               draft=None) -> list[Row]:
    rows = [Row("unoptimised"),
            Row(f"HF prompt lookup k={k}", generate_kwargs={"prompt_lookup_num_tokens": k})]
    if draft is not None:
        rows.append(Row(f"HF assisted (draft: first {draft.config.num_hidden_layers} blocks)",
                        generate_kwargs={"assistant_model": draft},
                        draft_bytes=weight_bytes(draft)))
    rows += headroom_rows(fp, s, ks or [k], skipped)
    rows.append(Row("headroom fp32_packed (no speculation)", over_packed=True, plan=plan_doc(
        fp, "bench-packed", [fp32_packed_transform(s)], "bench/speculative.py")))
    return rows + headroom_rows(fp, s, ks or [k], skipped, (fp32_packed_transform(s),))


def measure(rows: list[Row], model, ex, prompts, n: int, rounds: int) -> None:
    refs = [greedy(model, ids, n) for ids in prompts]                    # also the warm-up
    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]                        # alternate who is first
        rates = {row.name: run_row(row, model, ex, prompts, refs, n) for row in order}
        for row in rows:
            row.tok_s.append(rates[row.name])
            row.ratio.append(rates[row.name] / rates[rows[0].name])


def print_table(rows: list[Row], base_bytes: int, anchor_note: bool = True) -> None:
    print(f"\n{'row':58} {'tok/s':>7} {'x unopt (min-max)':>20} {'accept':>7} "
          f"{'tok/verify':>10} {'exact':>6} {'weights MiB':>11}")
    for row in rows:
        spread = f"{statistics.median(row.ratio):.2f} ({min(row.ratio):.2f}-{max(row.ratio):.2f})"
        st = row.stats
        acc = f"{st.acceptance:.2f}" if st.proposed else "-"
        tpv = f"{st.tokens_per_verify:.2f}" if st.verify_forwards else "-"
        exact = f"{sum(row.exact) / len(row.exact):.2f}" if row.exact else "-"
        mib = ((row.weight_bytes or base_bytes) + row.draft_bytes) / 2**20
        print(f"{row.name:58} {statistics.median(row.tok_s):7.1f} {spread:>20} {acc:>7} "
              f"{tpv:>10} {exact:>6} {mib:11.1f}")
    if anchor_note:
        print(NO_DRAFT_MODEL)


def class_prompts(per_class: int) -> dict[QueryClass, list]:
    """query class -> its first `per_class` prompts of the demo's mix (grounded included)."""
    out: dict[QueryClass, list] = {}
    for q in PROMPTS + GROUNDED_PROMPTS:
        if len(out.setdefault(q.query_class, [])) < per_class:
            out[q.query_class].append(q)
    return out


def _spec(row: Row) -> Optional[dict]:
    return speculative_of(row.plan or {})


def planner_choice(rows: list[Row], fp: str, s, query_class: str, draft_plan: list[dict],
                   over_packed: bool, ks: list[int]) -> tuple[Optional[Row], str]:
    """What the per-class planner (controlplane/planner/speculation.py, its own judge and
    ranking) keeps from this run's rows, each candidate's trial answered by its measured row
    (latency ratio = 1 / median tokens/s ratio): (the row, or None: the class runs its default
    plan; the planner's message). Over fp32_packed, that plan is the default and the bar."""
    family = [r for r in rows if r.plan is not None and r.over_packed == over_packed]
    bar = next((r for r in family if _spec(r) is None), None)
    by_spec = {(sp["draft"], sp["k"]): r for r in family if (sp := _spec(r)) is not None}

    def evaluate(doc: dict) -> dict:
        sp = speculative_of(doc)
        row = bar if sp is None else by_spec.get((sp["draft"], sp["k"]))
        if row is None:
            raise TrialError("not measured in this bench run (see --ks)")
        return {"exact_match": sum(row.exact) / len(row.exact),
                "latency_ratio": 1 / statistics.median(row.ratio)}
    base = plan_doc(fp, "bench-default", [fp32_packed_transform(s)] if over_packed else [], "bench/speculative.py")
    result = SpeculationSearch(evaluate, k_choices=ks).run(base, query_class, "bench", draft_plan)
    if result.best_trial is None:
        return None, result.message
    sp = speculative_of(result.best_trial.plan)
    return by_spec[(sp["draft"], sp["k"])], result.message


def run_classes(model, tok, ex, fp: str, s, args) -> None:
    """Per class: every row on the class's own prompts, the planner's choice, then the mix:
    once with the unoptimised model as the default plan, once with fp32_packed."""
    skipped = least_update_layers(model, s, tok, args.skip_layers) if args.skip_layers else []
    mix = {False: [0.0, 0.0], True: [0.0, 0.0]}         # over_packed -> [base s, chosen s]
    for qc, chosen in class_prompts(args.per_class).items():
        prompts = [chat_ids(tok, q.text) for q in chosen]
        rows = build_rows(fp, s, args.k, skipped, args.ks, args.draft)
        measure(rows, model, ex, prompts, args.new_tokens, args.rounds)
        print(f"\nclass {qc.value}: {len(prompts)} prompt(s)")
        print_table(rows, weight_bytes(model), anchor_note=False)
        tokens, base = len(prompts) * args.new_tokens, statistics.median(rows[0].tok_s)
        for over_packed in (False, True):
            pick, message = planner_choice(rows, fp, s, qc.value, _draft(s, skipped), over_packed,
                                           args.ks)
            default = next(r for r in rows if r.plan is not None and r.over_packed == over_packed
                           and _spec(r) is None) if over_packed else rows[0]
            rate = statistics.median((pick or default).tok_s)
            print(f"  planner, default plan {'fp32_packed' if over_packed else 'unoptimised'}: "
                  f"{(pick or default).name}: {rate / base:.2f}x ({message})")
            mix[over_packed][0] += tokens / base
            mix[over_packed][1] += tokens / rate
    for over_packed, (base_s, chosen_s) in mix.items():
        print(f"\nmix, each class on the planner's choice over the default plan "
              f"{'fp32_packed' if over_packed else 'unoptimised'}: "
              f"{base_s / chosen_s:.2f}x the unoptimised tokens/s")
    print(NO_DRAFT_MODEL)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--skip-layers", type=int, default=2)
    p.add_argument("--prompts", choices=("grounded", "mixed", "classes"), default="grounded")
    p.add_argument("--per-class", type=int, default=2, help="prompts per class (--prompts classes)")
    p.add_argument("--ks", type=lambda v: [int(k) for k in v.split(",")], default=list(K_CHOICES),
                   help="k values tried per class (--prompts classes), comma-separated")
    p.add_argument("--draft-layers", type=int, default=6,
                   help="blocks of the separate draft model for HF assisted generation (0: no row)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1 or args.per_class < 1:
        p.error("--rounds, --new-tokens and --per-class must be >= 1")
    if not args.ks or min(args.ks) < 1:
        p.error("--ks: give k values >= 1, e.g. 3,6,12")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    ex = Executor(model, s, fp)
    args.draft = truncated_draft(model, args.draft_layers) if args.draft_layers > 0 else None
    if args.prompts == "classes":
        print(f"SmolLM2-135M, per class x {args.per_class} prompt(s) x {args.new_tokens} new "
              f"tokens, {args.rounds} interleaved round(s), {torch.get_num_threads()} threads")
        return run_classes(model, tok, ex, fp, s, args)
    chosen = GROUNDED_PROMPTS if args.prompts == "grounded" else PROMPTS[::4]
    prompts = [chat_ids(tok, q.text) for q in chosen]
    rows = build_rows(fp, s, args.k, least_update_layers(model, s, tok, args.skip_layers),
                      draft=args.draft)
    print(f"SmolLM2-135M, {len(prompts)} {args.prompts} prompts x {args.new_tokens} new tokens, "
          f"{args.rounds} interleaved round(s), {torch.get_num_threads()} threads")
    measure(rows, model, ex, prompts, args.new_tokens, args.rounds)
    print_table(rows, weight_bytes(model))


if __name__ == "__main__":
    main()
