"""Kernels proven safe in a child process: a crashing kernel kills only its probe child, is
recorded unsafe (cached per machine), and the layer falls back. Nothing here runs a kernel
that may crash inside the test process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from headroom_sidecar.agent.adapters.base import WeightLayout
from headroom_sidecar.agent.executor.int8 import Int8Linear, safe_int8_kernels
from headroom_sidecar.agent.kernels import Int8Cpu, KernelSettings, probe
from headroom_sidecar.agent.kernels.int8_impls import Int8Kernel
from headroom_sidecar.agent.kernels.probe_child import _compare

RUNNER = "tests.agent.kernels.crashing_kernels"


@pytest.fixture
def settings(tmp_path):
    probe.clear_memo()
    yield KernelSettings(cache_dir=str(tmp_path), probe_timeout_s=120)
    probe.clear_memo()


def _case(kernel: str, in_features: int = 72, out_features: int = 32) -> probe.ProbeCase:
    return probe.ProbeCase.for_shape(kernel, out_features, in_features, torch.float32,
                                     torch.device("cpu"), runner=RUNNER)


def _file(settings: KernelSettings):
    return probe.cache_file(settings, probe.machine("cpu"))


def test_crashing_kernels_are_unsafe_and_the_parent_survives(settings):
    cases = [_case("exact"), _case("segv_k16_8", 72), _case("segv_k16_8", 64), _case("abort"),
             _case("exit3"), _case("raises"), _case("wrong"), _case("exact", 136, 40)]
    v = probe.ensure(cases, settings)            # one child, relaunched after each crash
    reasons = {c.kernel + str(c.k_mod): v[c.key].reason for c in cases if not v[c.key].safe}
    assert v[cases[0].key].safe and v[cases[2].key].safe and v[cases[-1].key].safe
    assert "SIGSEGV" in reasons["segv_k16_88"]                  # 72 % 16 == 8, > 1 row
    assert "SIGABRT" in reasons["abort8"] and "exit status 3" in reasons["exit38"]
    assert "RuntimeError: no kernel image" in reasons["raises8"]
    assert reasons["wrong8"].startswith("wrong result at 2 rows")
    assert len(reasons) == 5
    saved = json.loads(_file(settings).read_text())
    assert saved["machine"]["torch"] == torch.__version__ and "cpu" in saved["machine"]
    assert {k: d["safe"] for k, d in saved["verdicts"].items()} == {k: x.safe for k, x in v.items()}


def test_hanging_kernel_times_out_unsafe(tmp_path):
    probe.clear_memo()
    quick = KernelSettings(cache_dir=str(tmp_path), probe_timeout_s=12)
    v = probe.ensure([_case("hang")], quick)[_case("hang").key]
    assert not v.safe and "timed out after 12 s" in v.reason


def test_shape_class_boundaries():
    assert (_case("x", 64).k_mod, _case("x", 72).k_mod, _case("x", 63).k_mod) == (0, 8, 63)
    assert (_case("x", 64, 16).n_mod, _case("x", 64, 24).n_mod) == (0, 8)
    assert _case("x", 8, 33).shape() == (33, 136)     # same residues, big enough to tile
    assert _case("x", 72).key == _case("x", 136).key != _case("x", 80).key


def test_error_bound_is_inclusive_at_the_boundary():
    ref = torch.tensor([[1.0, 0.0]])
    assert _compare(torch.tensor([[1.5, 0.0]]), ref, 0.5) == ""
    assert "relative error" in _compare(torch.tensor([[1.5001, 0.0]]), ref, 0.5)
    assert "output shape" in _compare(torch.zeros(2, 2), ref, 0.5)
    assert "relative error nan" in _compare(torch.tensor([[float("nan"), 0.0]]), ref, 0.5)


def test_verdicts_come_from_the_machine_file_then_the_memo(settings):
    case = _case("exact")
    path = _file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {}, "verdicts": {
        case.key: {"safe": False, "reason": "from the file"}}}))
    assert probe.ensure([case], settings)[case.key].reason == "from the file"   # no child
    path.write_text("{not json")                                # memo on top: file not re-read
    assert probe.ensure([case], settings)[case.key].reason == "from the file"
    probe.clear_memo()
    assert probe.ensure([case], settings)[case.key].safe        # unreadable file: probed again


def test_a_child_that_cannot_start_is_not_cached(settings):
    case = probe.ProbeCase.for_shape("exact", 32, 64, torch.float32, torch.device("cpu"),
                                     runner="tests.agent.kernels.no_such_module")
    v = probe.ensure([case], settings)[case.key]
    assert not v.safe and "ModuleNotFoundError" in v.reason          # raised inside the case
    assert case.key in json.loads(_file(settings).read_text())["verdicts"]
    probe.clear_memo()
    other = _case("exact", 80)
    hasty = KernelSettings(cache_dir=settings.cache_dir, probe_timeout_s=0.01)
    bad = probe.ensure([other], hasty)[other.key]                   # killed before any case
    assert not bad.safe and bad.transient and "before the case ran: timed out" in bad.reason
    assert other.key not in json.loads(_file(settings).read_text())["verdicts"]


def _mark_unsafe(settings: KernelSettings, kernel: Int8Kernel, out_f: int, in_f: int) -> None:
    case = probe.ProbeCase.for_shape(kernel, out_f, in_f, torch.float32, torch.device("cpu"))
    path = _file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {}, "verdicts": {
        case.key: {"safe": False, "reason": "killed by SIGSEGV (test)"}}}))


@pytest.mark.parametrize("forced", [Int8Cpu.AUTO, Int8Cpu.INT8PACK_BF16])
def test_layer_falls_back_to_dequant_when_int8pack_is_unsafe(settings, forced):
    _mark_unsafe(settings, Int8Kernel.INT8PACK_BF16, 40, 64)
    s = KernelSettings(cache_dir=settings.cache_dir, int8_cpu=forced)
    q8 = Int8Linear.from_module(nn.Linear(64, 40), WeightLayout.OUT_IN, s)
    assert q8.kernel == Int8Kernel.DEQUANT
    assert q8.choice.rejected == {"int8pack_bf16": "probe: killed by SIGSEGV (test)"}
    assert "int8pack_bf16" not in q8.choice.candidates_us             # never run in-process
    assert q8(torch.randn(3, 64)).shape == (3, 40)
    other_class = Int8Linear.from_module(nn.Linear(64, 48), WeightLayout.OUT_IN, s)
    assert "int8pack_bf16" not in other_class.choice.rejected        # n % 16 differs


_GUARD = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    from headroom_sidecar.agent.adapters.base import WeightLayout
    from headroom_sidecar.agent.executor.int8 import Int8Linear, _int8pack_ok
    from headroom_sidecar.agent.kernels import Int8Cpu, KernelSettings
    k = int(sys.argv[1])
    s = KernelSettings(cache_dir=sys.argv[2], int8_cpu=Int8Cpu.INT8PACK_BF16)
    q8 = Int8Linear.from_module(nn.Linear(k, 16), WeightLayout.OUT_IN, s)
    for rows in (1, 2, 5):
        assert q8(torch.randn(rows, k)).shape == (rows, 16)
    print(json.dumps({"kernel": q8.kernel.value,
                      "safe": _int8pack_ok(torch.device("cpu"), torch.float32, 16, k, s)}))
""")


@pytest.mark.parametrize("in_features", [136, 128])     # % 16 == 8 crashes on some CPUs
def test_int8pack_is_not_chosen_where_it_would_crash(tmp_path, in_features):
    """In a child process of its own: if the guard were wrong this would segfault."""
    run = subprocess.run([sys.executable, "-c", _GUARD, str(in_features), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["kernel"] == ("int8pack_bf16" if out["safe"] else "dequant")


def test_safe_kernels_keep_the_preference_order(settings):
    safe, rejected = safe_int8_kernels(torch.device("cpu"), torch.float32, 32, 64, settings)
    assert safe[-1] == Int8Kernel.DEQUANT and not rejected
    dq = KernelSettings(cache_dir=settings.cache_dir, int8_cpu=Int8Cpu.DEQUANT)
    assert safe_int8_kernels(torch.device("cpu"), torch.float32, 32, 64, dq) == \
        ([Int8Kernel.DEQUANT], {})
