"""Decode speed of a Llama-3-8B-shaped model (random weights, bf16) at batch 1 on one NVIDIA GPU.

Rows, each applied by the Executor to the same model and rolled back after: unoptimised
eager; the execution transform (static KV cache + compiled, CUDA-graph decode); int8 weights
(Triton GEMV); 50% activation sparsity (Triton sparse GEMV on down_proj); all combined.
Then each kernel alone on the model's shapes: time, bytes it must move, achieved bandwidth,
against cuBLAS bf16 and against the device's peak memory bandwidth (device properties or NVML)
and a measured device-to-device copy.

    python bench/gpu.py [--layers 32] [--new-tokens 64] [--skip-compile]

Needs CUDA and the triton package; exits with a message saying which is missing otherwise.
Written in a session without a GPU: it has not been run on one yet.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headroom_sidecar.agent.adapters import resolve_structure  # noqa: E402
from headroom_sidecar.agent.executor import Executor, ExecutorSettings, weight_bytes  # noqa: E402
from headroom_sidecar.agent.fingerprint import fingerprint  # noqa: E402
from headroom_sidecar.proto.plan import PLAN_SCHEMA as SCHEMA, Plan  # noqa: E402
from bench.table import decode_steps_ms  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"bench/gpu.py needs an NVIDIA GPU with CUDA: torch.cuda.is_available() "
                         f"is False (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("bench/gpu.py needs the triton package for its kernels: pip install triton")


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)           # never materialise 32 GB of fp32
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


# ---------------------------------------------------------------------------------- plans

def plan(fp: str, name: str, transforms: list[dict]) -> Plan:
    return Plan.from_doc({"schema": SCHEMA, "plan_id": name, "version": 1,
                          "model_fingerprint": fp, "query_classes": [], "mode": "structural",
                          "transforms": transforms, "notes": "bench/gpu.py"})


@torch.no_grad()
def half_sparsity_thresholds(model, s, ids: torch.Tensor) -> dict[str, float]:
    """Per layer: the median |activation| at down_proj's input on `ids` (50% sparsity)."""
    found, hooks = {}, []
    for i, b in enumerate(s.blocks):
        def hook(mod, args, i=i):
            a = args[0].abs().flatten().float()
            found[str(i)] = float(a[:: max(1, a.numel() // 1_000_000)].median())
        hooks.append(b.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return found


def transforms(s, thresholds: dict[str, float]) -> dict[str, list[dict]]:
    execution = {"kind": "execution", "static_kv_cache": True, "compile": "cuda_graph"}
    int8 = {"kind": "weight_precision", "layers": {str(i): "int8" for i in range(s.num_layers)}}
    sparse = {"kind": "activation_sparsity", "thresholds": thresholds}
    return {"unoptimised (eager)": [], "execution (static cache + CUDA graphs)": [execution],
            "int8 weights (Triton)": [int8], "50% activation sparsity (Triton)": [sparse],
            "int8 + CUDA graphs": [int8, execution], "combined": [sparse, int8, execution]}


# -------------------------------------------------------------------------------- decoding

def decode_ms(model, ids: torch.Tensor, new_tokens: int) -> float:
    return statistics.median(decode_steps_ms(model, ids, new_tokens, sync=torch.cuda.synchronize))


def decode_rows(model, args) -> list[tuple[str, float, int, list[str]]]:
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, 32), device="cuda")
    thresholds = half_sparsity_thresholds(model, s, ids)
    # The warm-up compiles (the first decode step of a shape waits for it); the timed calls
    # run the captured graphs.
    ex = Executor(model, s, fp, ExecutorSettings(park_device="cpu", sparse_decode_gather=True))
    rows = []
    for name, ts in transforms(s, thresholds).items():
        if args.skip_compile and any(t["kind"] == "execution" for t in ts):
            continue
        report = ex.apply(plan(fp, name.split(" ")[0], ts))
        try:
            for _ in range(2):     # warm-up, same length (a static cache's size is per length)
                decode_ms(model, ids, args.new_tokens)
            ms = statistics.median(decode_ms(model, ids, args.new_tokens) for _ in range(3))
            rows.append((name, ms, weight_bytes(model), report.notes))
        finally:
            ex.rollback()
        print(f"  {name}: {ms:.2f} ms/token", flush=True)
    return rows


# --------------------------------------------------------------------------------- kernels

def peak_bandwidth() -> tuple[float | None, str]:
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, "device properties (2 x memory clock x bus width)"
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        pynvml.nvmlShutdown()
        return 2 * mhz * 1e6 * bus / 8, "NVML (2 x max memory clock x bus width)"
    except Exception as e:                          # noqa: BLE001 - reported, not fatal
        return None, f"unknown ({type(e).__name__}: {e})"


def copy_bandwidth() -> float:
    from triton.testing import do_bench
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)             # read + write


def kernel_rows() -> list[tuple[str, float, int]]:
    """(kernel on a shape, ms, bytes it must move)."""
    from triton.testing import do_bench

    from headroom_sidecar.agent.executor.int8 import quantize_per_channel
    from headroom_sidecar.agent.kernels import triton_kernels as tk
    h, inter, kv = 4096, 14336, 1024
    rows = []
    for name, (n, k) in {"q/o 4096x4096": (h, h), "k/v 1024x4096": (kv, h),
                         "gate/up 14336x4096": (inter, h), "down 4096x14336": (h, inter),
                         "lm_head 128256x4096": (LLAMA3_8B["vocab_size"], h)}.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        q, scale = quantize_per_channel(w)
        rows.append((f"cuBLAS bf16 {name}", do_bench(lambda: F.linear(x, w)), 2 * n * k + 2 * (n + k)))
        rows.append((f"Triton int8 {name}", do_bench(lambda: tk.int8_gemv(x, q, scale)),
                     n * k + 2 * n + 2 * (n + k)))
    w_t = torch.randn(inter, h, dtype=torch.bfloat16, device="cuda") * 0.02
    q_t, s = quantize_per_channel(w_t.t().contiguous())
    q_t = q_t.t().contiguous()
    for frac in (0.5, 0.9):
        a = torch.randn(1, inter, dtype=torch.bfloat16, device="cuda")
        a = a.masked_fill(torch.rand_like(a, dtype=torch.float32) < frac, 0)
        live = int((a != 0).sum())
        rows.append((f"Triton sparse bf16 down, {frac:.0%} zero", do_bench(lambda: tk.sparse_gemv(a, w_t)),
                     live * h * 2 + 2 * (inter + h)))
        rows.append((f"Triton sparse int8 down, {frac:.0%} zero",
                     do_bench(lambda: tk.sparse_gemv(a, q_t, s)), live * h + 2 * (inter + 2 * h)))
    return rows


# ---------------------------------------------------------------------------------- output

def print_decode(rows, base_ms: float) -> None:
    print(f"\n{'configuration':44s} {'ms/token':>9s} {'tokens/s':>9s} {'speed-up':>9s} {'weights':>9s}")
    for name, ms, nbytes, notes in rows:
        print(f"{name:44s} {ms:9.2f} {1e3 / ms:9.1f} {base_ms / ms:8.2f}x {nbytes / 2**30:7.2f}GB")
        for n in notes:
            print(f"    note: {n}")


def print_kernels(rows, peak: float | None, peak_src: str, copy_bw: float) -> None:
    print(f"\npeak memory bandwidth: {peak / 1e12:.2f} TB/s ({peak_src})" if peak
          else f"\npeak memory bandwidth: {peak_src}")
    print(f"measured device copy: {copy_bw / 1e12:.2f} TB/s")
    print(f"{'kernel':46s} {'us':>8s} {'MB moved':>9s} {'TB/s':>6s} {'% peak':>7s} {'% copy':>7s}")
    for name, ms, nbytes in rows:
        bw = nbytes / (ms * 1e-3)
        pct = f"{bw / peak:7.1%}" if peak else "    n/a"
        print(f"{name:46s} {ms * 1e3:8.1f} {nbytes / 1e6:9.1f} {bw / 1e12:6.2f} {pct} {bw / copy_bw:7.1%}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-compile", action="store_true", help="leave out the execution rows")
    args = p.parse_args(argv)
    require_gpu()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; Llama-3-8B shape, "
          f"{args.layers} layers, bf16, random weights, batch 1")
    model = build_model(args.layers)
    rows = decode_rows(model, args)
    print_decode(rows, rows[0][1])
    del model
    torch.cuda.empty_cache()
    peak, src = peak_bandwidth()
    print_kernels(kernel_rows(), peak, src, copy_bandwidth())


if __name__ == "__main__":
    main()
