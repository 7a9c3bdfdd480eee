"""The Kubernetes manifests parse and keep the drain contract (grace period > drain bound)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent.parent / "k8s"


def _docs() -> list[dict]:  # type: ignore[type-arg]
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def test_manifests_parse_and_share_a_namespace() -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Service", "ConfigMap"}
    assert {d["metadata"].get("namespace", "callmesh") for d in docs} == {"callmesh"}


def test_node_grace_period_exceeds_drain_timeout() -> None:
    node = next(d for d in _docs() if d["kind"] == "StatefulSet")
    spec = node["spec"]["template"]["spec"]
    command = " ".join(spec["containers"][0]["args"])
    drain = float(re.search(r"--drain-timeout (\d+)", command).group(1))  # type: ignore[union-attr]
    assert spec["terminationGracePeriodSeconds"] > drain
