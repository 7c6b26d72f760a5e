"""The comparison table, on SmolLM2-135M on the CPU, every figure measured in this one run.

Rows: unoptimised; int8 as a user would do it today (torch.ao dynamic quantisation, torchao
int8 weight-only), and torch.compile alone (static KV cache + compiled decode, fp32 weights);
head/layer pruning alone; headroom's plan; that plan combined with int8 on every block and the
output head (lm_head, tied to the embedding); and that with compiled decode. Every headroom
row is a plan document applied by the Executor on its default kernels (--kernel-rows adds the
other CPU int8 kernels); compiled rows compile in the warm-up, which is not timed.
Decode latency rounds are interleaved (every row once per round) so machine noise hits all rows
alike. Quality is teacher-forced on held-out text (controlplane/evaltexts.py, Split.HELD_OUT) against the
unoptimised model: top-1 agreement and perplexity ratio. Weight memory is the real bytes held:
parameters and buffers (shared storage once, tensor subclasses by their parts) plus weights
packed into opaque fbgemm objects.

    .venv/bin/python bench/table.py [--plan PLAN.json] [--sparsity 0.3] [--rounds 4] [--no-gemv]

`make demo` writes the plan headroom's loop found to .headroom/best-plan.json and
`make bench-table` passes it as --plan. Without --plan, the plan is built here from calibration text (Split.CALIBRATION), by the rules
the planner follows: int8 on every block, and per-layer activation-sparsity thresholds at the
--sparsity quantile of |activation|; the pruning row skips the --skip-layers blocks that change
the residual stream least and prunes the --prune-heads fraction of heads with the smallest
output share. Each row's label says where its plan came from.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.adapters import resolve_structure  # noqa: E402
from headroom_sidecar.agent.executor import Executor, ExecutorSettings, weight_bytes  # noqa: E402
from headroom_sidecar.agent.fingerprint import fingerprint  # noqa: E402
from headroom_sidecar.agent.latency import generate_timed  # noqa: E402
from headroom_sidecar.proto.plan import PLAN_SCHEMA as SCHEMA, Plan  # noqa: E402
from workloads.prompts import PROMPTS, chat_ids  # noqa: E402
from workloads.smollm2 import load_smollm2  # noqa: E402
from headroom_sidecar.controlplane.evaltexts import Split, texts  # noqa: E402


@dataclass
class Row:
    name: str
    source: str                          # where its plan / method came from
    model: nn.Module
    step_ms: list[float] = field(default_factory=list)   # per-token ms, one per generate
    ratio: list[float] = field(default_factory=list)     # / unoptimised, one per round
    bytes_held: int = 0
    top1: float = float("nan")
    ppl_ratio: float = float("nan")


# ------------------------------------------------------------------------------ memory

def _ao_packed_bytes(model: nn.Module) -> int:
    """torch.ao dynamic Linear keeps its int8 weight in an fbgemm pack: in*out bytes, plus
    column offsets and bias (4 bytes per output each). Lower bound: block padding not counted."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    return sum(m.in_features * m.out_features + 8 * m.out_features
               for m in model.modules() if isinstance(m, DynLinear))


def held_bytes(model: nn.Module) -> int:
    return weight_bytes(model) + _ao_packed_bytes(model)


# ------------------------------------------------------------------------- text and stats

def token_chunks(tok, split: Split, n: int, seq_len: int) -> list[torch.Tensor]:
    ids = torch.tensor(tok("\n\n".join(texts(split)), add_special_tokens=False)["input_ids"])
    chunks = list(ids[: len(ids) // seq_len * seq_len].view(-1, seq_len))
    if len(chunks) < n:
        raise ValueError(f"{split.value} text gives {len(chunks)} chunks of {seq_len}, need {n}")
    return chunks[:n]


class _Stats:
    """Calibration statistics, gathered by hooks on the unmodified model."""

    def __init__(self, s):
        self.s = s
        self.acts = {i: [] for i in range(s.num_layers)}     # |a| samples at down_proj input
        self.update = [0.0] * s.num_layers                   # sum of |out - in| / |in| per block
        self.head_sq = {}                                    # layer -> [H] summed squared norms

    def hooks(self) -> list:
        hs = []
        for i, b in enumerate(self.s.blocks):
            hs.append(b.mlp.down_proj.register_forward_pre_hook(self._act(i)))
            hs.append(b.module.register_forward_hook(self._update(i), with_kwargs=True))
            hs.append(b.attn.o_proj.register_forward_pre_hook(self._heads(i)))
        return hs

    def _act(self, i):
        return lambda mod, args: self.acts[i].append(args[0].abs().flatten()[::7])

    def _update(self, i):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]               # [B, T, H]
            y = out[0] if isinstance(out, tuple) else out
            self.update[i] += float((y - x).norm() / x.norm())
        return hook

    def _heads(self, i):
        def hook(mod, args):
            per_head = args[0].unflatten(-1, (self.s.num_heads, self.s.head_dim))  # [B, T, H, D]
            sq = per_head.pow(2).sum(dim=(0, 1, 3))                              # [H]
            self.head_sq[i] = self.head_sq.get(i, 0) + sq
        return hook


@torch.no_grad()
def calibrate(model: nn.Module, s, seqs: list[torch.Tensor]) -> dict:
    """Per layer: |activation| samples at down_proj's input, relative residual update, and
    each head's share of the o_proj input (squared norm)."""
    st = _Stats(s)
    hooks = st.hooks()
    try:
        for seq in seqs:
            model(seq.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {"acts": {i: torch.cat(v) for i, v in st.acts.items()}, "update": st.update,
            "head_share": {i: v / v.sum() for i, v in st.head_sq.items()}}


# -------------------------------------------------------------------------------- plans

def plan_doc(fp: str, plan_id: str, transforms: list[dict], notes: str) -> dict:
    return {"schema": SCHEMA, "plan_id": plan_id, "version": 1, "model_fingerprint": fp,
            "query_classes": [], "mode": "structural", "transforms": transforms, "notes": notes}


def sparsity_int8_plan(fp: str, s, stats: dict, sparsity: float) -> dict:
    thresholds = {str(i): round(float(torch.quantile(a.float()[:200_000], sparsity)), 6)
                  for i, a in stats["acts"].items()}
    return plan_doc(fp, f"bench-int8-sparse{int(sparsity * 100)}", [
        {"kind": "activation_sparsity", "thresholds": thresholds},
        {"kind": "weight_precision", "layers": {str(i): "int8" for i in range(s.num_layers)}}],
        f"bench/table.py rules: int8 all blocks, sparsity {sparsity:g} quantile thresholds")


def prune_plan(fp: str, s, stats: dict, skip: int, head_frac: float) -> dict:
    inner = range(1, s.num_layers - 1)           # first and last blocks are kept
    skipped = sorted(sorted(inner, key=lambda i: stats["update"][i])[:skip])
    ranked = sorted((float(v[h]), l, h) for l, v in stats["head_share"].items()
                    if l not in skipped for h in range(s.num_heads))
    heads: dict[str, list[int]] = {}
    for _, l, h in ranked[: int(head_frac * s.num_layers * s.num_heads)]:
        heads.setdefault(str(l), []).append(h)
    transforms = [{"kind": "prune_heads", "heads": {k: sorted(v) for k, v in heads.items()}}]
    if skipped:
        transforms.append({"kind": "skip_layers", "layers": skipped})
    return plan_doc(fp, "bench-prune", transforms,
                    f"bench/table.py rules: skip {skip} least-update layers, prune "
                    f"{head_frac:g} of heads by output share")


# --------------------------------------------------------------------------------- rows

@contextlib.contextmanager
def env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def headroom_row(base: nn.Module, name: str, source: str, doc: dict, *, int8_cpu: str = "auto",
                 sparse_decode: bool = False) -> Row:
    """A copy of the model with plan `doc` applied by the Executor (compile in the warm-up)."""
    model = copy.deepcopy(base)
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    plan = Plan.from_doc({**doc, "model_fingerprint": fp})
    with env(HEADROOM_INT8_CPU_KERNEL=int8_cpu):
        ex = Executor(model, s, fp, ExecutorSettings(park_device="cpu",
                                                     sparse_decode_gather=sparse_decode))
        ex.apply(plan)
    return Row(name, source, model)


def compile_note(row: Row) -> str | None:
    """How the row's decode steps ran: compiled, or eager (prefill, or a compile that failed)."""
    from headroom_sidecar.agent.executor.compiled import CompiledDecoder
    found = [m for m in row.model.modules() if isinstance(m, CompiledDecoder)]
    if not found:
        return None
    cd = found[0]
    errors = f"; compile errors: {list(cd.errors.values())}" if cd.errors else ""
    return (f"{row.name}: {cd.compiled_calls} compiled calls, {cd.eager_calls} eager "
            f"(prefill){errors}")


def without(doc: dict, kind: str) -> dict:
    return {**doc, "transforms": [t for t in doc["transforms"] if t["kind"] != kind]}


def merged(fp: str, plan_id: str, docs: list[dict], notes: str) -> dict:
    """One plan from several: transforms of one kind merged (int8 layers, thresholds, heads)."""
    by_kind: dict[str, dict] = {}
    for t in (t for d in docs for t in d["transforms"]):
        cur = by_kind.setdefault(t["kind"], copy.deepcopy(t))
        for key, val in t.items():
            if isinstance(val, dict):
                cur[key] = {**cur[key], **val}
            elif isinstance(val, list):
                cur[key] = sorted(set(cur[key]) | set(val))
            else:
                cur[key] = val
    return plan_doc(fp, plan_id, list(by_kind.values()), notes)


def int8_everywhere(fp: str, s) -> dict:
    layers = {**{str(i): "int8" for i in range(s.num_layers)}, "lm_head": "int8"}
    return plan_doc(fp, "int8-all", [{"kind": "weight_precision", "layers": layers}], "")


def fp32_packed_transform(s) -> dict:
    """fp32_packed on every block and the lm_head."""
    layers = {**{str(i): "fp32_packed" for i in range(s.num_layers)}, "lm_head": "fp32_packed"}
    return {"kind": "weight_precision", "layers": layers}


def fp32_packed_everywhere(fp: str, s) -> dict:
    return plan_doc(fp, "fp32-packed", [fp32_packed_transform(s)], "")


def plan_int8(fp: str, s, plan: dict) -> dict:
    """The loop's plan, eager, with int8 on every block and the lm_head."""
    return merged(fp, "plan-int8", [without(plan, "execution"), int8_everywhere(fp, s)], "")


def compiled_decode(fp: str) -> dict:
    return plan_doc(fp, "compiled", [{"kind": "execution", "static_kv_cache": True,
                                      "compile": "torch_compile"}], "")


def ao_dynamic_row(base: nn.Module) -> Row:
    from torch.ao.quantization import quantize_dynamic
    model = quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8, inplace=True)
    return Row("torch.ao dynamic int8", "quantize_dynamic({nn.Linear}, qint8): every linear "
               "incl. lm_head", model)


def torchao_row(base: nn.Module) -> Row | str:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        return f"torchao not installed ({e})"
    model = copy.deepcopy(base)
    quantize_(model, Int8WeightOnlyConfig())
    return Row("torchao int8 weight-only", "quantize_(Int8WeightOnlyConfig()): every linear "
               "incl. lm_head", model)


# ----------------------------------------------------------------------------- measuring

class StepTimer:
    """A logits processor: generate() calls it once per step; the gaps are step times.
    `sync` (e.g. torch.cuda.synchronize) runs before each stamp, for asynchronous devices."""

    def __init__(self, sync: Callable[[], object] | None = None):
        self.stamps: list[float] = []
        self.sync = sync

    def __call__(self, input_ids, scores):
        if self.sync is not None:
            self.sync()
        self.stamps.append(time.perf_counter())
        return scores

    def gaps_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


@torch.no_grad()
def decode_steps_ms(model: nn.Module, ids: torch.Tensor, new_tokens: int,
                    sync: Callable[[], object] | None = None) -> list[float]:
    """Greedy generate() of exactly `new_tokens`; the time of each decode step, in ms."""
    timer = StepTimer(sync)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, logits_processor=[timer],
                   pad_token_id=0)
    return timer.gaps_ms()


@torch.no_grad()
def logprobs(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(seq.unsqueeze(0)).logits[0, :-1].float(), dim=-1)   # [T-1, V]


def quality(row: Row, seqs: list[torch.Tensor], base_lp: list[torch.Tensor]) -> None:
    agree = n = 0
    nll_b = nll_p = 0.0
    for seq, lb in zip(seqs, base_lp):
        lp = logprobs(row.model, seq)
        agree += int((lp.argmax(-1) == lb.argmax(-1)).sum())
        target = seq[1:].unsqueeze(1)
        nll_b -= float(lb.gather(1, target).sum())
        nll_p -= float(lp.gather(1, target).sum())
        n += lp.shape[0]
    row.top1, row.ppl_ratio = agree / n, math.exp((nll_p - nll_b) / n)


def measure_latency(rows: list[Row], ids: torch.Tensor, rounds: int, new_tokens: int) -> None:
    """Every row once per round, order alternating against drift; per round, each row's
    decode ms per token (agent/latency.py, as trials time it) over the unoptimised row's in
    that same round is one ratio sample (rows[0] is the unoptimised model)."""
    for row in rows:                                        # warm-up, not recorded
        generate_timed(row.model, ids[0], 4)
    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]
        sample = {id(row): generate_timed(row.model, ids[0], new_tokens)[1] for row in order}
        for row in rows:
            row.step_ms.append(sample[id(row)])
            row.ratio.append(sample[id(row)] / sample[id(rows[0])])


def kernel_summary(model: nn.Module) -> str | None:
    """Which kernel each int8 layer runs (chosen by timing at apply), counted: 'int8pack_bf16
    x 150, dequant x 60'; None when the row has no headroom int8 layer."""
    from headroom_sidecar.agent.executor.int8 import Int8Linear
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Int8Linear):
            name = getattr(m.kernel, "value", str(m.kernel))
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x {n}" for k, n in sorted(counts.items())) or None


# ------------------------------------------------------------------------- per-GEMV timings

GEMV_SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
               "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}


def _median_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def _gemv_candidates(n: int, k: int) -> dict[str, Callable[[], object]]:
    from headroom_sidecar.agent.kernels import cpu, ops
    from headroom_sidecar.agent.executor.int8 import quantize_per_channel
    w, x = torch.randn(n, k) * 0.02, torch.randn(1, k)
    q, scale = quantize_per_channel(w)
    packed = cpu.fbgemm_pack(q, scale, None)
    xb, sb = x.bfloat16(), scale.bfloat16()
    out = {"fp32 F.linear": lambda: F.linear(x, w),
           "int8 dequant (weight-only ref)": lambda: ops.dequant_linear(x, q, scale, None),
           "int8 fbgemm W8A8 (packed)": lambda: cpu.fbgemm_linear(x, packed),
           "int8pack_mm bf16": lambda: torch._weight_int8pack_mm(xb, q, sb)}
    if n < k:                                        # the down projection: sparse decode paths
        w_t, rows = w.t().contiguous(), cpu.rowwise_u8_layout(q.t().contiguous())
        for frac in (0.5, 0.9):
            a = x.masked_fill(torch.rand_like(x) < frac, 0)
            out[f"sparse fp32 embedding_bag {frac:.0%}"] = lambda a=a: cpu.sparse_gemv_cpu(a, w_t)
            out[f"sparse int8 rowwise bag {frac:.0%}"] = (
                lambda a=a: cpu.sparse_gemv_int8_cpu(a, rows, scale))
    return out


def gemv_table() -> None:
    print(f"\nbatch-1 GEMV, median us ({torch.get_num_threads()} threads):")
    for name, (n, k) in GEMV_SHAPES.items():
        calls = 15 if n * k > 10_000_000 else 200
        cells = {c: _median_us(fn, calls) for c, fn in _gemv_candidates(n, k).items()}
        print(f"  {name:18s} " + "  ".join(f"{c}: {v:7.1f}" for c, v in cells.items()))


# ------------------------------------------------------------------------------- output

def print_table(rows: list[Row], notes: list[str]) -> None:
    base = rows[0]
    print(f"\n{'row':46s} {'ms/token':>9s} {'latency ratio (min-max, n)':>27s} {'weights':>9s} "
          f"{'memory':>8s} {'top-1':>7s} {'ppl ratio':>9s}")
    for r in rows:
        lat, ratio = statistics.median(r.step_ms), statistics.median(r.ratio)
        spread = f"{ratio:.3f} ({min(r.ratio):.2f}-{max(r.ratio):.2f}, n={len(r.ratio)})"
        print(f"{r.name:46s} {lat:9.2f} {spread:>27s} {r.bytes_held / 2**20:7.1f}MB "
              f"{1 - r.bytes_held / base.bytes_held:8.1%} {r.top1:7.4f} {r.ppl_ratio:9.4f}")
    print("\n(latency ratio: row / unoptimised, median over rounds, each round's pair timed in the"
          " same round; memory: reduction against unoptimised; top-1, ppl ratio: against "
          "unoptimised, teacher-forced on held-out text)")
    for r in rows:
        kernels = kernel_summary(r.model)
        print(f"  {r.name}: {r.source}" + (f"; int8 kernels: {kernels}" if kernels else ""))
    for n in notes + [n for r in rows if (n := compile_note(r))]:
        print(f"  note: {n}")


def loop_plan(args, fp: str, s, stats: dict) -> tuple[dict, str]:
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
        plan["model_fingerprint"] = fp
        return plan, f"plan file {args.plan} ({plan.get('plan_id')})"
    plan = sparsity_int8_plan(fp, s, stats, args.sparsity)
    return plan, f"built by bench rules (no --plan): {plan['notes']}"


def headroom_plans(fp: str, s, plan: dict, source: str, prune: dict,
                   with_prune: bool = False) -> list[tuple[str, str, dict]]:
    """(row name, where its plan comes from, plan document) of every plain headroom row."""
    # The int8 row runs eager even when the loop's plan compiles; the next row adds it back.
    full, packed = plan_int8(fp, s, plan), fp32_packed_everywhere(fp, s)
    out = [
        ("torch.compile alone (headroom execution)", "static KV cache + compiled decode, fp32 "
         "weights", compiled_decode(fp)),
        ("headroom: fp32_packed (every layer, lm_head)", "fp32 weights in the layout of the fp32 "
         "GEMM timed fastest here (lossless but for summation order)", packed),
        # merged: the later document wins a layer, so the plan's int8 layers stay int8.
        ("headroom: plan, eager, fp32_packed elsewhere", f"{source}, without its execution "
         "transform; fp32_packed on the layers it leaves fp32",
         merged(fp, "plan-packed", [packed, without(plan, "execution")], "")),
        ("headroom: pruning alone", prune["notes"], prune),
        ("headroom: plan (as the loop found it)", source, plan),
        ("headroom: plan + int8 (blocks, lm_head)", f"{source}; int8 on every block and the "
         "lm_head (tied embedding too)", full),
        ("headroom: plan + int8 + compiled decode", f"{source}; int8 everywhere; static KV cache "
         "+ compiled decode", merged(fp, "plan-int8-compile", [full, compiled_decode(fp)], ""))]
    if with_prune:
        out.append(("headroom: plan + int8 + pruning", f"{source} + {prune['notes']}",
                    merged(fp, "plan-int8-prune", [full, prune], "")))
    return out


def build_rows(base, s, fp, args, stats) -> tuple[list[Row], list[str]]:
    notes = []
    plan, source = loop_plan(args, fp, s, stats)
    prune = prune_plan(fp, s, stats, args.skip_layers, args.prune_heads)
    rows = [Row("unoptimised", "SmolLM2-135M-Instruct fp32, eager", base), ao_dynamic_row(base)]
    tao = torchao_row(base)
    rows.append(tao) if isinstance(tao, Row) else notes.append(tao)
    plans = headroom_plans(fp, s, plan, source, prune, args.with_prune)
    rows += [headroom_row(base, name, src, doc) for name, src, doc in plans]
    if args.kernel_rows:
        full = plan_int8(fp, s, plan)
        rows += [headroom_row(base, f"headroom: plan + int8, kernel {k}", f"{source}; "
                              f"HEADROOM_INT8_CPU_KERNEL={k}", full, int8_cpu=k)
                 for k in ("dequant", "fbgemm")]
        rows.append(headroom_row(base, "headroom: plan + int8, sparse decode", f"{source}; "
                                 "sparse decode gather on", full, sparse_decode=True))
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", help="plan JSON (its fingerprint is replaced by this model's)")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--skip-layers", type=int, default=1)
    p.add_argument("--prune-heads", type=float, default=0.1)
    p.add_argument("--with-prune", action="store_true", help="add a plan + int8 + pruning row")
    p.add_argument("--kernel-rows", action="store_true",
                   help="add the plan + int8 rows on the other CPU kernels (dequant, fbgemm W8A8, "
                        "sparse decode)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--no-gemv", action="store_true", help="skip the per-GEMV timings")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base, tok = load_smollm2()
    s = resolve_structure(base)
    fp = fingerprint(base, s)
    stats = calibrate(base, s, token_chunks(tok, Split.CALIBRATION, 4, args.seq_len))
    rows, notes = build_rows(base, s, fp, args, stats)
    seqs = token_chunks(tok, Split.HELD_OUT, args.eval_seqs, args.seq_len)
    base_lp = [logprobs(base, q) for q in seqs]
    for row in rows:
        row.bytes_held = held_bytes(row.model)
        quality(row, seqs, base_lp)
    measure_latency(rows, chat_ids(tok, PROMPTS[0].text), args.rounds, args.new_tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds x {args.new_tokens} tokens; eval {args.eval_seqs} x {args.seq_len} "
          f"held-out tokens; {time.perf_counter() - t0:.0f} s in all")
    print_table(rows, notes)
    if not args.no_gemv:
        gemv_table()


if __name__ == "__main__":
    main()
