"""deploy/: the Kubernetes manifests (kustomize-rendered when kubectl is installed) validated
offline against the Kubernetes schemas, and the hardening they and the images promise."""
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kit import HEALTH_PORT, K8S_VERSION, one, validate_all, workloads

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _render() -> list[dict]:
    """kustomize output (with the policies ConfigMap) if kubectl is here, else the raw files."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                              str(DEPLOY / "k8s")], check=True, capture_output=True, text=True,
                             timeout=120).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return _render()


def test_every_manifest_is_valid_kubernetes(docs):
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service"}
    validate_all(docs)


def test_the_validator_rejects_a_misspelt_probe(docs):
    """The schema check has teeth: one typo in a probe fails it."""
    sts = one(docs, "StatefulSet", "headroom-controlplane")
    bad = yaml.safe_load(yaml.safe_dump(sts))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {"grpc": {"prot": 8081}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_statefulset_has_a_headless_service(docs):
    sts = one(docs, "StatefulSet", "headroom-controlplane")
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["replicas"] == 1   # DuckDB has one writer process
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_controlplane_probes_use_grpc_health(docs):
    sts = one(docs, "StatefulSet", "headroom-controlplane")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HEADROOM_CP_HEALTH_PORT"] == str(HEALTH_PORT)
    assert {"containerPort": HEALTH_PORT, "name": "health"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": HEALTH_PORT}, probe


def test_pods_run_non_root_read_only_without_capabilities(docs):
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]


def test_tls_comes_from_secrets(docs):
    for workload in workloads(docs):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"].endswith("-tls")
        # Readable by the pod's group (fsGroup 10001), not only by root.
        assert volumes["tls"]["secret"]["defaultMode"] & 0o040


@pytest.mark.skipif(not shutil.which("kubectl"), reason="the ConfigMap exists only once rendered")
def test_policies_configmap_is_the_policies_folder(docs):
    sts = one(docs, "StatefulSet", "headroom-controlplane")
    pod = sts["spec"]["template"]["spec"]
    name = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "policies")
    cm = one(docs, "ConfigMap", name)
    policies = {p.name: p.read_text() for p in (ROOT / "policies").glob("*.yaml")}
    assert cm["data"] == policies
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert env["HEADROOM_POLICIES"] == mounts["policies"]


def test_dashboard_is_deployed_in_k8s_and_compose(docs):
    dep = one(docs, "Deployment", "headroom-dashboard")
    one(docs, "Service", "headroom-dashboard")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HEADROOM_ADDRESS"] == "headroom-controlplane:50051"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["dashboard"]["depends_on"]["controlplane"] == \
        {"condition": "service_healthy"}
    assert compose["services"]["controlplane"]["environment"]["HEADROOM_CP_HEALTH_PORT"] == \
        str(HEALTH_PORT)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.dashboard"])
def test_images_run_as_non_root_with_a_healthcheck(name):
    steps = _instructions(DEPLOY / name)
    users = [args for op, args in steps if op == "USER"]
    assert users, f"{name} has no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [op for op, _ in steps].index("USER") > max(
        i for i, (op, _) in enumerate(steps) if op == "RUN"), "USER must come after every RUN"
    assert any(op == "HEALTHCHECK" for op, _ in steps), f"{name} has no HEALTHCHECK"


def test_controlplane_healthcheck_calls_the_health_port():
    steps = dict(_instructions(DEPLOY / "Dockerfile"))
    assert f"HEADROOM_CP_HEALTH_PORT={HEALTH_PORT}" in steps["ENV"]
    assert '"headroom-controlplane", "health", "--address", "127.0.0.1:%d"' % HEALTH_PORT in \
        steps["HEALTHCHECK"]


def test_dockerignore_keeps_secrets_and_state_out_of_the_image():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "*.duckdb", "deploy/certs", "**/*.key"} <= ignored
