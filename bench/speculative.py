"""Speculative decoding on SmolLM2-135M (CPU): tokens/s against the unoptimised model, with
the output checked to be the unoptimised model's own.

Rows (all greedy, the same prompts, `--new-tokens` forced per prompt):
- unoptimised: plain generate();
- HF prompt lookup: generate(prompt_lookup_num_tokens=k) on the unoptimised model;
- HF assisted generation with a separate small draft model: none can be built offline here
  (SmolLM2-135M is the smallest model on this machine and nothing can be downloaded): said so;
- headroom prompt lookup: plan {"kind": "execution", "speculative": {"draft": "prompt_lookup"}};
- headroom self-speculative: draft = the same model under int8 on every block + the
  --skip-layers blocks with the smallest residual update (calibration text, bench/table.py's
  rule), verifier = the unoptimised model.
Rounds are interleaved (every row once per round, all prompts); a row's ratio per round is its
tokens/s over the unoptimised row's in that round. Exact = the fraction of prompts whose tokens
equal the unoptimised greedy tokens. Weight memory: the model's weights plus the draft's own
(its int8 copies; skipped layers share the verifier's tensors).

    .venv/bin/python bench/speculative.py [--rounds 4] [--new-tokens 64] [--k 4] [--prompts grounded]
"""
from __future__ import annotations

import argparse
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
from headroom_sidecar.agent.plan import Plan  # noqa: E402
from headroom_sidecar.agent.executor.speculative.generate import SpecStats  # noqa: E402
from headroom_sidecar.agent.executor.speculative.install import installed  # noqa: E402
from bench.table import calibrate, plan_doc, token_chunks  # noqa: E402
from workloads.prompts import GROUNDED_PROMPTS, PROMPTS, chat_ids  # noqa: E402
from workloads.smollm2 import load_smollm2  # noqa: E402
from headroom_sidecar.controlplane.evaltexts import Split  # noqa: E402

NO_DRAFT_MODEL = ("HF assisted (separate draft model): not run: no smaller model of SmolLM2's "
                  "vocabulary can be built offline here, and none can be downloaded")


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


def build_rows(fp: str, s, k: int, skipped: list[int]) -> list[Row]:
    def execution(spec: dict) -> dict:
        return {"kind": "execution", "static_kv_cache": False, "compile": "none",
                "speculative": spec}
    draft = [{"kind": "weight_precision", "layers": {str(i): "int8" for i in range(s.num_layers)}}]
    if skipped:
        draft.append({"kind": "skip_layers", "layers": skipped})
    return [Row("unoptimised"),
            Row(f"HF prompt lookup k={k}", generate_kwargs={"prompt_lookup_num_tokens": k}),
            Row(f"headroom prompt lookup k={k}", plan_doc(fp, "bench-spec-lookup", [execution(
                {"draft": "prompt_lookup", "k": k})], "bench/speculative.py")),
            Row(f"headroom self-spec k={k} (draft int8 + skip {skipped})", plan_doc(
                fp, "bench-spec-self", [execution({"draft": "self", "k": k, "draft_plan": {
                    "transforms": draft}})], "bench/speculative.py"))]


def measure(rows: list[Row], model, ex, prompts, n: int, rounds: int) -> None:
    refs = [greedy(model, ids, n) for ids in prompts]                    # also the warm-up
    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]                        # alternate who is first
        rates = {row.name: run_row(row, model, ex, prompts, refs, n) for row in order}
        for row in rows:
            row.tok_s.append(rates[row.name])
            row.ratio.append(rates[row.name] / rates[rows[0].name])


def print_table(rows: list[Row], base_bytes: int) -> None:
    print(f"\n{'row':58} {'tok/s':>7} {'x unopt (min-max)':>20} {'accept':>7} "
          f"{'tok/verify':>10} {'exact':>6} {'weights MiB':>11}")
    for row in rows:
        spread = f"{statistics.median(row.ratio):.2f} ({min(row.ratio):.2f}-{max(row.ratio):.2f})"
        st = row.stats
        acc = f"{st.acceptance:.2f}" if st.proposed else "-"
        tpv = f"{st.tokens_per_verify:.2f}" if st.verify_forwards else "-"
        exact = f"{sum(row.exact) / len(row.exact):.2f}" if row.exact else "-"
        mib = (base_bytes + row.draft_bytes) / 2**20
        print(f"{row.name:58} {statistics.median(row.tok_s):7.1f} {spread:>20} {acc:>7} "
              f"{tpv:>10} {exact:>6} {mib:11.1f}")
    print(NO_DRAFT_MODEL)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--skip-layers", type=int, default=2)
    p.add_argument("--prompts", choices=("grounded", "mixed"), default="grounded")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        p.error("--rounds and --new-tokens must be >= 1")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    ex = Executor(model, s, fp)
    chosen = GROUNDED_PROMPTS if args.prompts == "grounded" else PROMPTS[::4]
    prompts = [chat_ids(tok, q.text) for q in chosen]
    rows = build_rows(fp, s, args.k, least_update_layers(model, s, tok, args.skip_layers))
    print(f"SmolLM2-135M, {len(prompts)} {args.prompts} prompts x {args.new_tokens} new tokens, "
          f"{args.rounds} interleaved round(s), {torch.get_num_threads()} threads")
    measure(rows, model, ex, prompts, args.new_tokens, args.rounds)
    print_table(rows, weight_bytes(model))


if __name__ == "__main__":
    main()
