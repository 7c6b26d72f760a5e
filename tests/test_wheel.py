"""The wheel a user installs: built from the checkout's files (not its build outputs), installed
into a fresh virtual environment outside the checkout, and used from a directory without one:
an agent attached to a tiny model streams to `headroom-controlplane serve`, whose tables
`headroom-controlplane query` lists; `headroom-dashboard` finds its app; the shipped policies
are the default.

The fresh environment gets its dependencies from the project's .venv without the checkout: a
.pth file in its site-packages names the .venv's site-packages, and a directory named by a .pth
file is added to sys.path without running that directory's own .pth files, so the editable
install of the checkout stays invisible (checked: headroom_sidecar comes from the new venv).
Runs in `make test` (about a minute: the build generates the gRPC stubs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("agent", "controlplane", "dashboard")
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120
SERVE_START_TIMEOUT_S = 60

pytestmark = pytest.mark.timeout(600)


def _run(cmd, *, cwd: Path, env=None, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, (f"{' '.join(map(str, cmd))} (in {cwd}) exited "
                                  f"{done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def _clean_env(**extra: str) -> dict:
    """No PYTHONPATH or HEADROOM_* from the test run: the installed package finds its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("HEADROOM_")}
    return {**env, **extra}


def _source_copy(dest: Path) -> Path:
    """The checkout's tracked and not-ignored files only (no stubs, no build/, no .venv)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    assert not list((src / "proto").glob("headroom_pb2*")), "stubs leaked into the source copy"
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", out, src], cwd=src, env=_clean_env(), timeout_s=BUILD_TIMEOUT_S)
    wheels = list(out.glob("headroom_sidecar-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the checkout, the wheel installed, dependencies from .venv."""
    home = tmp_path_factory.mktemp("venv")
    assert ROOT not in home.parents
    _run([sys.executable, "-m", "venv", "--without-pip", home], cwd=home)
    python = home / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=home).stdout.strip())
    (site / "_project_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the .venv's editable headroom-sidecar is visible to pip; it is never
    # touched, and the new venv's own copy comes first on sys.path.
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
          "--no-warn-script-location", wheel], cwd=home, env=_clean_env())
    return home


def _python(venv: Path, code: str, cwd: Path, timeout_s: float = RUN_TIMEOUT_S) -> str:
    return _run([venv / "bin" / "python", "-c", code], cwd=cwd, env=_clean_env(),
                timeout_s=timeout_s).stdout


# ---------------------------------------------------------------------- the wheel itself
def test_wheel_ships_the_contract_stubs_policies_and_dashboard(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for name in ("headroom_sidecar/proto/headroom.proto", "headroom_sidecar/proto/headroom_pb2.py",
                 "headroom_sidecar/proto/headroom_pb2_grpc.py", "headroom_sidecar/proto/headroom_pb2.pyi",
                 "headroom_sidecar/dashboard/app.py", "headroom_sidecar/dashboard/launch.py",
                 "headroom_sidecar/agent/__init__.py", "headroom_sidecar/controlplane/cli.py"):
        assert name in names, name
    screens = [n for n in names if n.startswith("headroom_sidecar/dashboard/screens/")
               and n.endswith(".py")]
    policies = [n for n in names if n.startswith("headroom_sidecar/policies/") and n.endswith(".yaml")]
    expected_screens = sorted((ROOT / "dashboard" / "screens").glob("*.py"))
    assert len(screens) == len(expected_screens) > 0, screens
    expected_policies = sorted((ROOT / "policies").rglob("*.yaml"))
    assert len(policies) == len(expected_policies) > 0, policies
    assert not any(n.startswith(("tests/", "bench/", "workloads/", "agent/", "proto/")) for n in names)
    for extra in EXTRAS:
        assert f"Provides-Extra: {extra}" in metadata
        assert f'extra == "{extra}"' in metadata, extra
    assert "Requires-Dist: grpcio" in metadata and "Requires-Dist: torch>=2.4" in metadata
    assert "headroom-controlplane = headroom_sidecar.controlplane.cli:main" in entry_points
    assert "headroom-dashboard = headroom_sidecar.dashboard.launch:main" in entry_points


# ---------------------------------------------------------------------- installed
CHECK_REQUIREMENTS = """
import json, sys
from importlib.metadata import PackageNotFoundError, distribution, version
from packaging.requirements import Requirement
dist = distribution("headroom-sidecar")
bad, checked = [], 0
for text in dist.requires or []:
    req = Requirement(text)
    wanted = any(req.marker is None or req.marker.evaluate({"extra": e}) for e in %r)
    if not wanted or req.name == "headroom-sidecar":
        continue
    checked += 1
    try:
        have = version(req.name)
    except PackageNotFoundError:
        bad.append(f"{text}: not installed")
        continue
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"{text}: have {have}")
print(json.dumps({"checked": checked, "bad": bad, "files": str(dist.locate_file(""))}))
"""


def test_every_requirement_of_the_extras_is_satisfied(venv, tmp_path):
    got = json.loads(_python(venv, CHECK_REQUIREMENTS % (("",) + EXTRAS,), tmp_path))
    assert got["bad"] == [] and got["checked"] >= 15, got
    assert Path(got["files"]).resolve().is_relative_to(venv.resolve()), got


WHERE = """
import headroom_sidecar, headroom_sidecar.agent, headroom_sidecar.controlplane.cli
from headroom_sidecar.controlplane.policy.settings import PolicySettings
print(list(headroom_sidecar.__path__)[0]); print(PolicySettings().folder)
"""


def test_package_and_default_policies_come_from_the_new_venv(venv, tmp_path):
    assert not (tmp_path / "policies").exists()
    package_dir, policies = _python(venv, WHERE, tmp_path).split()
    assert Path(package_dir).resolve().is_relative_to(venv.resolve()), package_dir
    assert len(_python(venv, "import headroom_sidecar; print(len(headroom_sidecar.__path__))",
                       tmp_path).split()) == 1
    assert Path(policies).resolve().is_relative_to(venv.resolve()), policies
    assert sorted(p.name for p in Path(policies).glob("*.yaml")) == \
        sorted(p.name for p in (ROOT / "policies").glob("*.yaml"))


AGENT = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from headroom_sidecar import agent
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64)).eval()
handle = agent.attach(model, address=sys.argv[1], agent_id="wheel-agent", sample_rate=1.0,
                      shutdown_timeout_ms=5000)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4, 5, 6]]))
flushed = handle.exporter.flush(20000)
c = handle.exporter.counters()
handle.detach()
print(json.dumps({"flushed": flushed, "acked_records": c.acked_records}))
"""


@pytest.fixture
def control_plane(venv, tmp_path):
    """`headroom-controlplane serve` from the venv's bin, in a directory without policies/."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([venv / "bin" / "headroom-controlplane", "serve", "--db",
                             tmp_path / "cp.duckdb", "--port", "0", "--port-file", port_file],
                            cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not start (rc {proc.poll()}):\n{proc.communicate()[0]}")
        time.sleep(0.1)
    yield f"127.0.0.1:{int(port_file.read_text())}"
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _query(venv: Path, address: str, sql: str, cwd: Path) -> list:
    out = _run([venv / "bin" / "headroom-controlplane", "query", "--address", address, "--json",
                sql], cwd=cwd, env=_clean_env()).stdout
    return json.loads(out)["rows"]


def test_agent_streams_to_the_installed_control_plane_and_tables_list(venv, control_plane, tmp_path):
    got = json.loads(_python(venv, AGENT.replace("sys.argv[1]", repr(control_plane)), tmp_path,
                             timeout_s=180).strip().splitlines()[-1])
    assert got == {"flushed": True, "acked_records": 1}, got
    tables = {r["name"] for r in _query(venv, control_plane, "SHOW TABLES", tmp_path)}
    assert {"agents", "requests", "head_stats", "plans", "audit_log", "schema_version"} <= tables
    rows = _query(venv, control_plane, "SELECT agent_id, count(*) AS n FROM requests GROUP BY 1",
                  tmp_path)
    assert rows == [{"agent_id": "wheel-agent", "n": 1}], rows


def test_dashboard_entry_point_runs_streamlit_on_the_installed_app(venv, tmp_path):
    code = ("from headroom_sidecar.dashboard import launch; import json; "
            "print(json.dumps(launch.command([])))")
    cmd = json.loads(_python(venv, code, tmp_path))
    app = Path(cmd[cmd.index("run") + 1])
    assert app.is_file() and app.resolve().is_relative_to(venv.resolve()), app
    assert (app.parent / "screens").is_dir()
    assert Path(cmd[0]).parent == venv / "bin", cmd   # the venv's python runs streamlit
    helped = _run([venv / "bin" / "headroom-dashboard", "--help"], cwd=tmp_path, env=_clean_env())
    assert "Usage" in helped.stdout and "run" in helped.stdout, helped.stdout
