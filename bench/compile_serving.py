"""What serving sees when the execution transform compiles decode: the wait, then the speed.

SmolLM2-135M with int8 weights (blocks and lm_head), timed eager first; then the same with
compiled decode applied by the Executor, and requests of 24 new tokens back to back: the
first one waits for the compile (its worst step is the compile), the next --after show the
compiled speed, side by side with the eager figure.

    .venv/bin/python bench/compile_serving.py [--cold] [--after 5]

--cold compiles into a fresh inductor cache directory (the first apply on a host); without it
the cache under /tmp/torchinductor_$USER is used (a plan compiled before compiles faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _plan(fp: str, compiled: bool):
    from headroom_sidecar.proto.plan import PLAN_SCHEMA as SCHEMA, Plan
    layers = {**{str(i): "int8" for i in range(30)}, "lm_head": "int8"}
    ts = [{"kind": "weight_precision", "layers": layers}]
    if compiled:
        ts.append({"kind": "execution", "static_kv_cache": True, "compile": "torch_compile"})
    return Plan.from_doc({"schema": SCHEMA, "plan_id": f"int8{'-compiled' if compiled else ''}",
                          "version": 1, "model_fingerprint": fp, "query_classes": [],
                          "mode": "structural", "transforms": ts, "notes": ""})


def _request(model, ids) -> list[float]:
    from bench.table import decode_steps_ms
    return decode_steps_ms(model, ids, 24)


def _line(label: str, gaps: list[float], wall_s: float, extra: str = "") -> str:
    return (f"{label:>12s}: {wall_s:5.1f} s, decode median {statistics.median(gaps):6.1f} ms/token,"
            f" worst step {max(gaps):7.0f} ms{extra}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cold", action="store_true", help="fresh inductor cache (first compile)")
    p.add_argument("--after", type=int, default=5, help="requests served compiled before stopping")
    args = p.parse_args(argv)
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="headroom-inductor-")
    from headroom_sidecar.agent.adapters import resolve_structure
    from headroom_sidecar.agent.executor import Executor, ExecutorSettings
    from headroom_sidecar.agent.executor.compiled import CompiledDecoder
    from headroom_sidecar.agent.fingerprint import fingerprint
    from workloads.prompts import PROMPTS, chat_ids
    from workloads.smollm2 import load_smollm2
    model, tok = load_smollm2()
    s = resolve_structure(model)
    fp = fingerprint(model, s)
    ex = Executor(model, s, fp, ExecutorSettings())
    ids = chat_ids(tok, PROMPTS[0].text)
    ex.apply(_plan(fp, compiled=False))
    _request(model, ids)
    eager = [g for _ in range(3) for g in _request(model, ids)]
    print(_line("eager int8", eager, 0.0) + " (3 requests, no compile running)")
    t_apply = time.perf_counter()
    print(f"apply: {ex.apply(_plan(fp, compiled=True)).notes}")
    (cd,) = [m for m in model.modules() if isinstance(m, CompiledDecoder)]
    for i in range(1 + args.after):
        t0 = time.perf_counter()
        gaps = _request(model, ids)
        label = "compiling" if i == 0 else "compiled"
        print(_line(f"request {i + 1}", gaps, time.perf_counter() - t0, f"  [{label}]"), flush=True)
    print(f"compiled calls {cd.compiled_calls}, eager {cd.eager_calls} (prefill); "
          f"compile errors: {cd.errors or 'none'}; {time.perf_counter() - t_apply:.0f} s since apply")


if __name__ == "__main__":
    main()
