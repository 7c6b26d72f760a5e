"""deploy/helm/headroom: rendered by `helm template` where helm is installed, else
by tests/deploy/helmrender (Go's text/template, the engine helm runs, with the helm functions
the chart uses); every manifest validated offline against the Kubernetes schemas, and the
properties deploy/k8s promises checked on the chart too."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.kit import HEALTH_PORT, K8S_VERSION, one, validate_all, workloads

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "headroom"
RENDERER = Path(__file__).resolve().parent / "helmrender" / "main.go"
RELEASE = "rel"



def test_a_renderer_is_installed():
    """`make test` installs Go (apt golang-go); without helm or Go the chart would go unchecked."""
    assert shutil.which("helm") or shutil.which("go"), \
        "neither helm nor go to render the chart: install golang-go (the Makefile's test target does)"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stderr}"
    return done.stdout


def render(tmp_path: Path, overrides: dict | None = None, chart: Path = CHART) -> list[dict]:
    """The chart's manifests with `overrides` merged over values.yaml."""
    over = tmp_path / "overrides.json"
    over.write_text(json.dumps(overrides or {}))
    if shutil.which("helm"):
        out = _run(["helm", "template", RELEASE, str(chart), "--namespace", "default",
                    "--kube-version", K8S_VERSION, "-f", str(over)])
    else:
        values = _merge(yaml.safe_load((chart / "values.yaml").read_text()), overrides or {})
        (tmp_path / "values.json").write_text(json.dumps(values))
        (tmp_path / "chart.json").write_text(json.dumps(yaml.safe_load(
            (chart / "Chart.yaml").read_text())))
        out = _run(["go", "run", str(RENDERER), str(chart), str(tmp_path / "values.json"),
                    str(tmp_path / "chart.json"), RELEASE, "default"])
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[dict]:
    return render(tmp_path_factory.mktemp("helm"))


def _controlplane(docs) -> dict:
    return one(docs, "StatefulSet", f"{RELEASE}-headroom-controlplane")


def _container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container["env"]}


def test_chart_policies_are_the_repository_policies():
    """The chart packs its own copy (helm reads only files inside the chart): `make
    helm-policies` refreshes it; this fails when someone forgot."""
    chart = {p.name: p.read_bytes() for p in (CHART / "policies").glob("*.yaml")}
    repo = {p.name: p.read_bytes() for p in (ROOT / "policies").glob("*.yaml")}
    assert chart == repo


def test_every_manifest_is_valid_kubernetes(docs):
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Service", "Service",
                                               "StatefulSet"]
    validate_all(docs)


def test_statefulset_has_a_headless_service(docs):
    sts = _controlplane(docs)
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["replicas"] == 1
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_probes_are_grpc_on_the_health_port(docs):
    c = _container(_controlplane(docs))
    assert _env(c)["HEADROOM_CP_HEALTH_PORT"] == str(HEALTH_PORT)
    assert {"containerPort": HEALTH_PORT, "name": "health"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": HEALTH_PORT}, probe


def test_pods_run_non_root_read_only_with_resources(docs):
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        c = pod["containers"][0]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        assert c["resources"]["requests"] and c["resources"]["limits"]
        tls = {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]
        assert tls["secretName"].endswith("-tls") and tls["defaultMode"] & 0o040


def test_policies_configmap_holds_every_policy_file(docs):
    sts = _controlplane(docs)
    pod = sts["spec"]["template"]["spec"]
    name = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "policies")
    cm = one(docs, "ConfigMap", name)
    assert cm["data"] == {p.name: p.read_text() for p in (ROOT / "policies").glob("*.yaml")}
    mounts = {m["name"]: m["mountPath"] for m in _container(sts)["volumeMounts"]}
    assert _env(_container(sts))["HEADROOM_POLICIES"] == mounts["policies"]


def test_a_policy_change_rolls_the_pod(docs, tmp_path):
    chart = shutil.copytree(CHART, tmp_path / "chart")
    (chart / "policies" / "safety.yaml").write_text("# changed\n" + (
        CHART / "policies" / "safety.yaml").read_text())
    changed = _controlplane(render(tmp_path, chart=chart))
    key = "checksum/policies"
    before = _controlplane(docs)["spec"]["template"]["metadata"]["annotations"][key]
    assert changed["spec"]["template"]["metadata"]["annotations"][key] != before


def test_metrics_endpoint_is_off_by_default_and_opens_on_request(docs, tmp_path):
    assert "HEADROOM_CP_METRICS_PORT" not in _env(_container(_controlplane(docs)))
    on = render(tmp_path, {"controlplane": {"metricsPort": 9464}})
    c = _container(_controlplane(on))
    assert _env(c)["HEADROOM_CP_METRICS_PORT"] == "9464"
    assert _env(c)["HEADROOM_CP_METRICS_HOST"] == "0.0.0.0"   # reachable by the scraper
    assert {"containerPort": 9464, "name": "metrics"} in c["ports"]
    svc = one(on, "Service", f"{RELEASE}-headroom-controlplane")
    assert {"port": 9464, "targetPort": "metrics", "name": "metrics"} in svc["spec"]["ports"]
    validate_all(on)


def test_dashboard_talks_to_the_controlplane_service_and_can_be_left_out(docs, tmp_path):
    dep = one(docs, "Deployment", f"{RELEASE}-headroom-dashboard")
    assert _env(_container(dep))["HEADROOM_ADDRESS"] == f"{RELEASE}-headroom-controlplane:50051"
    without = render(tmp_path, {"dashboard": {"enabled": False}})
    assert not [d for d in without if d["kind"] == "Deployment"]
