"""Kernels proven safe in a child process before the serving process runs them.

Some kernels crash the whole process instead of raising: torch._weight_int8pack_mm segfaults
on an AVX-512 VNNI Xeon without avx512_bf16 when in_features % 16 == 8 and there is more than
one row. So before a module may run a kernel, that (kernel, shape class, dtype, device) is run
once in a child process (a subprocess running agent/kernels/probe_child.py: no fork of a
serving process with threads) on a representative shape of the class, at several row counts, and its
output compared with agent.kernels.reference. A signal, abort, nonzero exit, timeout or wrong
result makes it unsafe; the caller falls to its next kernel.

Verdicts are cached per machine (CPU model + flags, or GPU name; torch version) in
`<HEADROOM_KERNEL_CACHE_DIR>/probe-<machine hash>.json`, and memoised in the process on top.
All the cases one plan apply needs go to ONE child; it prints a BEGIN line before each case
and a verdict line after, flushed, so when a case kills it the earlier verdicts survive, the
case that began without a verdict is the unsafe one, and a new child runs the rest.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from headroom_sidecar.agent.kernels.settings import KernelSettings

K_CLASS, N_CLASS = 64, 16       # shape class: (in_features % 64, out_features % 16)
K_BASE, N_BASE = 128, 32        # the representative: K_BASE + k % 64 by N_BASE + n % 16
PROBE_ROWS = (1, 2, 5, 37)      # decode, and prefill-sized row counts off the 4-row tiling
# A runner is a module with prepare(kernel, q, scale, bias) -> (x [M, K] -> [M, N]) computing
# x @ (q * scale[:, None]).T + bias, rel_error_bound(kernel, dtype), and optionally
# probe_rows(kernel) (default PROBE_ROWS).
DEFAULT_RUNNER = "headroom_sidecar.agent.kernels.int8_impls"
_LINE = "HEADROOM-PROBE "        # prefix of the child's protocol lines on stdout


@dataclass(frozen=True)
class ProbeCase:
    kernel: str
    k_mod: int                  # in_features % K_CLASS
    n_mod: int                  # out_features % N_CLASS
    dtype: str                  # the activation dtype the module is called with ("float32")
    device: str                 # "cpu", "cuda:0"
    runner: str = DEFAULT_RUNNER

    @staticmethod
    def for_shape(kernel: str, out_features: int, in_features: int, dtype: torch.dtype,
                  device: torch.device, runner: str = DEFAULT_RUNNER) -> "ProbeCase":
        return ProbeCase(str(getattr(kernel, "value", kernel)), in_features % K_CLASS,
                         out_features % N_CLASS, str(dtype).removeprefix("torch."),
                         str(torch.device(device)), runner)

    @property
    def key(self) -> str:
        return (f"{self.kernel}|{self.dtype}|k%{K_CLASS}={self.k_mod}|n%{N_CLASS}={self.n_mod}"
                f"|{self.runner}")

    def shape(self) -> tuple[int, int]:
        """The representative (out_features, in_features) the child runs."""
        return N_BASE + self.n_mod, K_BASE + self.k_mod


@dataclass(frozen=True)
class Verdict:
    safe: bool
    reason: str                 # "" when safe
    transient: bool = False     # the child failed outside any case: not cached on disk


def ensure(cases: Iterable[ProbeCase],
           settings: KernelSettings | None = None) -> dict[str, Verdict]:
    """Verdict for each case: from the memo, the machine's cache file, or child processes
    (one child for all the missing cases of a device, more only after a crash)."""
    settings = settings or KernelSettings.resolve()
    cases = list(dict.fromkeys(cases))
    out: dict[str, Verdict] = {}
    for device in dict.fromkeys(c.device for c in cases):
        out.update(_ensure_device([c for c in cases if c.device == device], device, settings))
    return out


_LOCK = threading.Lock()
_MEMO: dict[str, dict[str, Verdict]] = {}        # cache file path -> key -> verdict


def _ensure_device(cases: list[ProbeCase], device: str,
                   settings: KernelSettings) -> dict[str, Verdict]:
    ident = machine(device)
    path = cache_file(settings, ident)
    with _LOCK:                  # one prober at a time; the others wait for its verdicts
        memo = _MEMO.setdefault(str(path), _load(path))
        missing = [c for c in cases if c.key not in memo]
        if missing:
            found = run_children(missing, settings.probe_timeout_s)
            memo.update(found)
            kept = {k: v for k, v in memo.items() if not v.transient}
            _save(path, ident, {**_load(path), **kept})    # another process may have added some
        return {c.key: memo[c.key] for c in cases}


def clear_memo() -> None:
    """Forget the in-process verdicts (the cache files stay)."""
    with _LOCK:
        _MEMO.clear()


# ---- the machine and its cache file -------------------------------------------------------

def machine(device: str) -> dict[str, str]:
    """What a verdict depends on: the processor (model, ISA flags) or GPU, and torch."""
    return dict(_machine(str(torch.device(device))))


@functools.lru_cache(maxsize=None)
def _machine(device: str) -> tuple[tuple[str, str], ...]:
    dev = torch.device(device)
    ident = {"torch": torch.__version__, "device_type": dev.type}
    if dev.type == "cuda":
        ident["gpu"] = torch.cuda.get_device_name(dev)
        ident["cuda"] = str(torch.version.cuda)
    else:
        model_name, flags = _cpuinfo()
        ident.update(cpu=model_name, machine=platform.machine(),
                     flags_sha=hashlib.sha256(flags.encode()).hexdigest()[:16])
    return tuple(ident.items())


def _cpuinfo() -> tuple[str, str]:
    """(model name, ISA flags) from /proc/cpuinfo; the platform string elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return (fields.get("model name") or platform.processor() or "unknown",
            fields.get("flags") or fields.get("Features") or "")


def cache_file(settings: KernelSettings, ident: dict[str, str]) -> Path:
    """The verdict file of the machine `ident` (from machine())."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return settings.cache_path() / f"probe-{digest}.json"


def _load(path: Path) -> dict[str, Verdict]:
    try:
        raw = json.loads(path.read_text())["verdicts"]
        return {k: Verdict(bool(v["safe"]), str(v["reason"])) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}               # missing or unreadable: probe again, rewrite it


def _save(path: Path, ident: dict[str, str], verdicts: dict[str, Verdict]) -> None:
    doc = {"machine": ident, "verdicts": {
        k: {"safe": v.safe, "reason": v.reason} for k, v in sorted(verdicts.items())}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)    # atomic: a reader sees the old file or the new one
    except OSError:
        pass                     # an unwritable cache costs a probe next time, nothing else


# ---- the parent side: child runs until every case has a verdict --------------------------

def run_children(cases: list[ProbeCase], timeout_s: float) -> dict[str, Verdict]:
    """Verdicts for `cases`, relaunching after each case that kills its child."""
    pending, out = list(cases), {}
    while pending:
        lines, failure = _launch(pending, timeout_s)
        began = None
        for msg in lines:
            if "begin" in msg:
                began = msg["begin"]
            elif msg.get("key") == began:
                out[began], began = Verdict(bool(msg["safe"]), str(msg["reason"])), None
        pending = [c for c in pending if c.key not in out]
        if began is not None and failure:
            out[began] = Verdict(False, failure)                  # it died inside this case
            pending = [c for c in pending if c.key != began]
        elif pending:            # it died (or stopped) outside any case: no progress possible
            why = f"probe child failed before the case ran: {failure or 'no verdict'}"
            out.update({c.key: Verdict(False, why, transient=True) for c in pending})
            pending = []
    return out


# The child imports agent.kernels without agent/__init__.py (which starts the whole agent:
# gRPC, observation, control): a bare package object stands in for `agent`.
_BOOTSTRAP = ("import sys, types; root = sys.argv[1]; sys.path.insert(0, root); "
              "pkg = types.ModuleType('agent'); pkg.__path__ = [root + '/agent']; "
              "sys.modules['agent'] = pkg; "
              "from agent.kernels.probe_child import main; sys.exit(main())")


def _launch(cases: list[ProbeCase], timeout_s: float) -> tuple[list[dict], str]:
    """One child over `cases` -> (its protocol messages, "" or how it failed)."""
    job = json.dumps({"threads": torch.get_num_threads(), "cases": [asdict(c) for c in cases]})
    root = str(Path(__file__).resolve().parents[2])     # the folder holding agent/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    try:
        proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, root], cwd=root, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError as e:         # no python, no fork: unsafe for now, probed again next time
        return [], f"could not start {sys.executable}: {e}"
    try:
        stdout, stderr = proc.communicate(job, timeout=timeout_s)
        failure = _describe(proc.returncode, stderr)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        failure = f"timed out after {timeout_s:g} s"
    lines = [json.loads(l[len(_LINE):]) for l in stdout.splitlines() if l.startswith(_LINE)]
    return lines, failure


def _describe(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return ""
    tail = [l for l in stderr.strip().splitlines() if l.strip()][-1:]
    if returncode < 0:
        what = f"killed by {signal.Signals(-returncode).name}"
    else:
        what = f"exit status {returncode}"
    return what + (f" ({tail[0][:200]})" if tail else "")

