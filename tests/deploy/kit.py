"""What the manifest tests (deploy/k8s) and the chart tests (deploy/helm) share."""
from __future__ import annotations

import kubernetes_validate

K8S_VERSION = "1.32.0"   # the oldest cluster we claim; gRPC probes are GA since 1.27
HEALTH_PORT = 8081


def one(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]


def validate_all(docs) -> None:
    """Every document against the Kubernetes schemas, offline, strictly."""
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
