"""The Kubernetes package renders, validates against the API schemas offline, and keeps its
cross-cutting rules: drain-aware grace periods, probes everywhere, selectors that select,
Secrets that exist, a NetworkPolicy that admits routers only, autoscaling above the PDB."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from callmesh import metric_names

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "production")
# The oldest Kubernetes minor still commonly run, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# After --drain-timeout the node gives routers 2 s to move links and closes HTTP (2 s).
NODE_DRAIN_EXTRA_S = 4.0
# The node's live-calls gauge as Prometheus sees it: the autoscaler's metric.
LIVE_CALLS_METRIC = metric_names.SPECS[metric_names.LIVE_CALLS].exposed(metric_names.NODE)

Obj = dict[str, Any]


def _load_renderer() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render.render(K8S / "overlays" / request.param)


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _workloads(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objects:
        spec = render.pod_spec(obj)
        if spec is not None:
            yield obj, spec


def _matches(selector: Obj, labels: dict[str, str]) -> bool:
    if set(selector) - {"matchLabels"}:
        raise AssertionError(f"only matchLabels selectors are used here, got {selector}")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _template_labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"]["labels"]
    return labels


def _flag(args: list[str], name: str) -> str:
    for arg in args:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} is not set in {args}")


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(
    overlay: tuple[str, list[Obj]], version: str
) -> None:
    _, objects = overlay
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")


def test_the_overlays_hold_every_part(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("StatefulSet", "callmesh-node"),
        ("Deployment", "callmesh-router"),
        ("Deployment", "callmesh-effects-worker"),
        ("Service", "callmesh-router"),
        ("PodDisruptionBudget", "callmesh-node"),
        ("HorizontalPodAutoscaler", "callmesh-node"),
        ("NetworkPolicy", "callmesh-node-from-routers"),
    } <= kinds
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {_one(objects, "Namespace", next(iter(namespaces)))["metadata"]["name"]}
    if name == "production":
        assert ("Ingress", "callmesh") in kinds
        # Production brings its own Secrets: none is generated with example values.
        assert not [o for o in objects if o["kind"] == "Secret"]


def test_every_image_is_set_by_the_overlay(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    for obj, spec in _workloads(objects):
        for c in spec["containers"]:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", c["image"]), (obj["metadata"]["name"], c)


# ---------------------------------------------------------------- drain and probes


def test_node_grace_period_exceeds_its_drain_bound(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    node = _one(objects, "StatefulSet", "callmesh-node")
    spec = node["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    drain = float(_flag(container["args"], "--drain-timeout"))
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > drain + NODE_DRAIN_EXTRA_S
    # Liveness must not restart a node mid-drain, even one too busy to answer /livez.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def _drain_bound(
    objects: list[Obj], name: str, flag: str, default: float
) -> tuple[Obj, Obj, float]:
    """(pod spec, its one container, the drain bound its flag sets, else the default)."""
    spec = _one(objects, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    try:
        return spec, container, float(_flag(container["args"], flag))
    except AssertionError:
        return spec, container, default


def test_router_grace_period_exceeds_prestop_and_drain_bound(
    overlay: tuple[str, list[Obj]],
) -> None:
    from callmesh.config import RouterConfig

    _, objects = overlay
    default = RouterConfig().router_drain_s
    spec, container, drain = _drain_bound(objects, "callmesh-router", "--drain-timeout", default)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = spec["terminationGracePeriodSeconds"]
    # SIGTERM comes after the preStop; the HTTP server then needs its shutdown (2 s).
    assert grace > float(pre_stop[1]) + drain + 2
    # Liveness must not restart a router mid-drain.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_effects_worker_grace_period_exceeds_its_drain_bound(
    overlay: tuple[str, list[Obj]],
) -> None:
    from events.worker_config import WorkerConfig

    _, objects = overlay
    worker = _one(objects, "Deployment", "callmesh-effects-worker")
    spec, container, drain = _drain_bound(
        objects, "callmesh-effects-worker", "--drain-timeout-s", WorkerConfig().drain_timeout_s
    )
    assert spec["terminationGracePeriodSeconds"] > drain
    # A fixed port for /livez, /readyz and /metrics, the one the probes and the scrape use.
    port = int(_flag(container["args"], "--port"))
    assert port != 0
    assert container["ports"][0]["containerPort"] == port
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_every_container_has_probes_on_a_port_it_serves(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    for obj, spec in _workloads(objects):
        for c in spec["containers"]:
            where = f"{obj['metadata']['name']}/{c['name']}"
            port_names = {p["name"] for p in c.get("ports", [])}
            port_numbers = {p["containerPort"] for p in c.get("ports", [])}
            paths = {
                "readinessProbe": "/readyz",
                "livenessProbe": "/livez",
                "startupProbe": "/livez",
            }
            for probe, path in paths.items():
                if probe == "startupProbe" and probe not in c:
                    continue
                assert probe in c, f"{where} has no {probe}"
                get = c[probe]["httpGet"]
                assert get["path"] == path, f"{where} {probe}"
                assert get["port"] in port_names | port_numbers, where


def test_the_probed_paths_are_served() -> None:
    from conversation_node.app import ConversationNode
    from events.cli import metrics_app
    from router.app import Router

    for source in (
        inspect.getsource(ConversationNode.app),
        inspect.getsource(Router.app),
        inspect.getsource(metrics_app),
    ):
        for path in ("/livez", "/readyz", "/healthz", "/metrics"):
            assert re.search(rf"add_get\(\s*\"{path}\"", source), path


def test_pods_run_as_non_root_with_requests_and_limits(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    units = {"m": 1e-3, "": 1.0, "Mi": 2**20, "Gi": 2**30, "Ki": 2**10}

    def quantity(value: str | int) -> float:
        number, unit = re.fullmatch(r"([\d.]+)([a-zA-Z]*)", str(value)).groups()  # type: ignore[union-attr]
        return float(number) * units[unit]

    for obj, spec in _workloads(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            resources = c["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, (obj["metadata"]["name"], resource)


# ---------------------------------------------------------------- selectors and references


def test_selectors_match_their_pods(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    workloads = [o for o, _ in _workloads(objects)]
    for obj in workloads:
        assert _matches(obj["spec"]["selector"], _template_labels(obj)), obj["metadata"]["name"]
    for svc in (o for o in objects if o["kind"] == "Service"):
        selected = [
            w
            for w in workloads
            if _matches({"matchLabels": svc["spec"]["selector"]}, _template_labels(w))
        ]
        assert len(selected) == 1, svc["metadata"]["name"]
        ports = selected[0]["spec"]["template"]["spec"]["containers"][0]["ports"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in {p["name"] for p in ports}
    node = _one(objects, "StatefulSet", "callmesh-node")
    assert _one(objects, "Service", node["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def _references(objects: list[Obj]) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every Secret and ConfigMap the package uses."""
    for _, spec in _workloads(objects):
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    yield "Secret", source["secretRef"]["name"], None
                if "configMapRef" in source:
                    yield "ConfigMap", source["configMapRef"]["name"], None
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                if "configMapKeyRef" in ref:
                    yield "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                yield "Secret", volume["secret"]["secretName"], None
            if "configMap" in volume:
                yield "ConfigMap", volume["configMap"]["name"], None
    for ingress in (o for o in objects if o["kind"] == "Ingress"):
        for tls in ingress["spec"].get("tls", []):
            yield "Secret", tls["secretName"], None


def _operator_secrets() -> set[str]:
    """Secrets k8s/README.md's "Secrets" table says the operator creates in production."""
    text = (K8S / "README.md").read_text()
    section = text.split("## Secrets", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.MULTILINE))


def test_every_referenced_secret_and_config_map_exists(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    present = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    documented = _operator_secrets()
    refs = list(_references(objects))
    assert refs
    for kind, ref, key in refs:
        if (kind, ref) in present:
            obj = present[(kind, ref)]
            if key is not None:
                assert key in obj.get("data", {}), f"{kind}/{ref} has no key {key}"
            continue
        assert name == "production" and kind == "Secret", f"{name}: {kind}/{ref} is missing"
        assert ref in documented, f"Secret {ref} is neither in the overlay nor in README"
    if name == "dev":
        # The same Secrets production expects, with the same keys.
        generated = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
        assert generated == documented - {"callmesh-tls", "valkey-users"}


# ---------------------------------------------------------------- network policy


def test_only_routers_reach_the_nodes(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    node = _one(objects, "StatefulSet", "callmesh-node")
    router = _one(objects, "Deployment", "callmesh-router")
    others = [o for o, _ in _workloads(objects) if o is not router]
    node_ports = {
        p["containerPort"] for p in node["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy"
        and _matches(p["spec"]["podSelector"], _template_labels(node))
    ]
    assert policies, "no NetworkPolicy selects the node pods"
    router_peers = 0
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= node_ports
            for peer in rule["from"]:
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:
                    # Only the metrics exception, and only Prometheus' own pods.
                    assert policy["metadata"]["name"] == "callmesh-node-metrics"
                    assert peer["podSelector"]["matchLabels"] == {
                        "app.kubernetes.io/name": "prometheus"
                    }
                    continue
                assert _matches(peer["podSelector"], _template_labels(router))
                for other in others:
                    assert not _matches(peer["podSelector"], _template_labels(other))
                router_peers += 1
    assert router_peers >= 1


# ---------------------------------------------------------------- disruption and autoscaling


def test_pdb_selects_the_nodes_and_autoscaling_stays_above_it(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    node = _one(objects, "StatefulSet", "callmesh-node")
    pdb = _one(objects, "PodDisruptionBudget", "callmesh-node")
    hpa = _one(objects, "HorizontalPodAutoscaler", "callmesh-node")
    assert pdb["spec"]["selector"] == node["spec"]["selector"]
    # An eviction must always be possible: some node can drain onto the others.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"] >= 1
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # The autoscaler owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in node["spec"]


def test_autoscaler_targets_the_node_statefulset_on_live_calls(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    hpa = _one(objects, "HorizontalPodAutoscaler", "callmesh-node")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "callmesh-node",
    }
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == LIVE_CALLS_METRIC
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]
    # Down one node at a time: each drains its calls onto the others.
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])


def test_ingress_terminates_tls_for_long_lived_websockets() -> None:
    objects = render.render(K8S / "overlays" / "production")
    ingress = _one(objects, "Ingress", "callmesh")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    hosts = {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}
    paths = set()
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in hosts
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["name"] == "callmesh-router"
            paths.add(path["path"])
    assert paths == {"/v1/calls", "/v1/twilio"}
    config = _one(objects, "ConfigMap", "callmesh")["data"]
    assert config["CALLMESH_PUBLIC_URL"] == f"https://{next(iter(hosts))}"


# ---------------------------------------------------------------- dependency charts (k8s/deps)


@dataclass(frozen=True)
class ChartKeys:
    """The values keys a file in k8s/deps sets, each checked against the chart's own values
    (and templates where the meaning matters) at ``version``, read where ``read`` says.
    ``x.*`` admits anything under ``x``: a free-form map (ACL users, config merged into the
    server's) or a Kubernetes object the chart passes through."""

    values_file: str
    chart: str
    version: str
    read: str
    keys: frozenset[str]


CHARTS = (
    ChartKeys(
        "valkey-values.yaml",
        "valkey/valkey",
        "1.0.0",
        "valkey-io/valkey-helm: valkey/README.md (values table, 1.0 layout), valkey/UPGRADE.md "
        "(0.x to 1.0), valkey/tests/persistence_test.yaml and removed_values_test.yaml, "
        "valkey/templates/init_config.yaml; 1.0.0 released per valkey.io/blog/valkey-helm-1.0.0-ga",
        frozenset(
            {
                "replica.enabled",
                "replica.replicas",
                "replica.replicationUser",
                "replica.minReplicasToWrite",
                "persistence.enabled",
                "persistence.size",
                "extraConfig",
                "auth.enabled",
                "auth.usersExistingSecret",
                "auth.aclUsers.*",
                "podDisruptionBudget.enabled",
                "podDisruptionBudget.maxUnavailable",
                "resources.*",
                "metrics.enabled",
            }
        ),
    ),
    ChartKeys(
        "nats-values.yaml",
        "nats/nats",
        "2.12.5",
        "nats-io/k8s: helm/charts/nats/values.yaml at b30d530 (nats 2.12.4, before the 2.12.5 "
        "bump, nats-io/k8s#1141), files/config/jetstream.yaml, files/stateful-set/"
        "pod-template.yaml, files/pod-disruption-budget.yaml, test/config_test.go and "
        "resources_test.go",
        frozenset(
            {
                "config.cluster.enabled",
                "config.cluster.replicas",
                "config.jetstream.enabled",
                "config.jetstream.fileStore.enabled",
                "config.jetstream.fileStore.pvc.enabled",
                "config.jetstream.fileStore.pvc.size",
                "config.jetstream.memoryStore.enabled",
                "config.jetstream.merge.*",
                "podTemplate.topologySpreadConstraints.*",
                "podTemplate.merge.*",
                "container.merge.*",
                "podDisruptionBudget.enabled",
                "promExporter.enabled",
                "natsBox.enabled",
            }
        ),
    ),
    ChartKeys(
        "prometheus-adapter-values.yaml",
        "prometheus-community/prometheus-adapter",
        "5.3.0",
        "prometheus-community/helm-charts: charts/prometheus-adapter/Chart.yaml (5.3.0), "
        "values.yaml (4.x; the same keys since 3.x), templates/configmap.yaml and "
        "deployment.yaml",
        frozenset({"prometheus.url", "prometheus.port", "rules.default", "rules.custom"}),
    ),
)


def _values(name: str) -> Obj:
    values: Obj = yaml.safe_load((K8S / "deps" / name).read_text())
    return values


def _leaf_keys(values: Obj, prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{path}.")
        else:
            yield path


def _verified_key(path: str, keys: frozenset[str]) -> str | None:
    """The entry of ``keys`` that admits ``path``, if any."""
    for key in keys:
        if path == key or (key.endswith(".*") and path.startswith(key[:-1])):
            return key
    return None


@pytest.mark.parametrize("chart", CHARTS, ids=lambda c: c.values_file)
def test_dependency_values_set_only_keys_checked_against_the_chart(chart: ChartKeys) -> None:
    used = set()
    for path in _leaf_keys(_values(chart.values_file)):
        key = _verified_key(path, chart.keys)
        assert key is not None, f"{chart.values_file}: {path} is not a key of {chart.chart}"
        used.add(key)
    # Every checked key is still set: the table describes the file, not an older one.
    assert used == chart.keys
    # The file and the install guide install the chart version the keys were checked at.
    for text in ((K8S / "deps" / chart.values_file).read_text(), (K8S / "README.md").read_text()):
        installs = re.findall(rf"helm install \S+ {re.escape(chart.chart)}\b(.*)", text)
        assert installs, f"no helm install of {chart.chart}"
        for rest in installs:
            assert f"--version {chart.version}" in rest, (chart.chart, rest)


def test_valkey_keeps_every_checkpoint_on_disk_and_on_one_url() -> None:
    from state_store.store import AUTO, Durability

    valkey = _values("valkey-values.yaml")
    replica = valkey["replica"]
    # Replication needs a volume per pod: the chart refuses it without one.
    assert replica["enabled"] and valkey["persistence"]["enabled"]
    assert valkey["persistence"]["size"]
    # replica.replicas counts the primary (chart 1.0): a primary and two replicas.
    pods = replica["replicas"]
    assert pods >= 3
    lines = (line.split(None, 1) for line in valkey["extraConfig"].splitlines())
    assert {name: value for name, value in lines} == {
        "appendonly": "yes",
        "appendfsync": "everysec",
        "maxmemory-policy": "noeviction",
    }
    # callmesh speaks one redis:// URL, not Sentinel.
    assert not valkey.get("sentinel", {}).get("enabled", False)
    users = valkey["auth"]["aclUsers"]
    assert "default" in users
    assert set(users[replica["replicationUser"]]["permissions"].split()) >= {
        "+psync",
        "+replconf",
        "+ping",
    }
    # Neither Valkey nor callmesh waits for more replicas than there are.
    assert replica["minReplicasToWrite"] <= pods - 1
    production = _one(render.render(K8S / "overlays" / "production"), "ConfigMap", "callmesh")
    wanted = int(production["data"].get("CALLMESH_CHECKPOINT_REPLICAS", AUTO))
    url = "redis://default:x@valkey.callmesh.svc.cluster.local:6379/0"
    assert Durability.for_url(url, wanted).replicas <= pods - 1


def test_nats_keeps_the_streams_on_disk_in_a_quorum() -> None:
    from nats.js.api import StorageType

    from events.streams import stream_configs

    nats = _values("nats-values.yaml")["config"]
    assert nats["cluster"]["enabled"] and nats["cluster"]["replicas"] >= 3
    jetstream = nats["jetstream"]
    assert jetstream["enabled"]
    assert jetstream["fileStore"]["enabled"] and jetstream["fileStore"]["pvc"]["enabled"]
    # No memory store: callmesh's streams are all on file.
    assert jetstream["memoryStore"]["enabled"] is False
    assert {c.storage for c in stream_configs(replicas=3)} == {StorageType.FILE}
    # Merged into the server's jetstream block: fsync on every write.
    assert jetstream["merge"] == {"sync_interval": "always"}


def test_stream_replicas_match_the_nats_servers() -> None:
    from events.streams import REPLICAS_ENV, stream_configs, stream_replicas

    servers = _values("nats-values.yaml")["config"]["cluster"]["replicas"]
    for overlay_name, expected in (("production", servers), ("dev", 1)):
        config = _one(render.render(K8S / "overlays" / overlay_name), "ConfigMap", "callmesh")
        replicas = stream_replicas({REPLICAS_ENV: config["data"][REPLICAS_ENV]})
        assert replicas == expected
        assert {c.num_replicas for c in stream_configs(replicas=replicas)} == {expected}
    with pytest.raises(ValueError, match=REPLICAS_ENV):
        stream_replicas({REPLICAS_ENV: "7"})


def test_the_autoscaling_metric_is_exported_and_served_by_the_adapter() -> None:
    import dataclasses

    from conversation_node.node_http import NodeHttp
    from conversation_node.node_services import NodeServices

    spec = metric_names.SPECS[metric_names.LIVE_CALLS]
    assert spec.kind is metric_names.Kind.GAUGE and metric_names.NODE in spec.processes
    (field,) = [f for f in dataclasses.fields(NodeServices) if f.name == "metrics"]
    factory = field.default_factory
    assert callable(factory)
    metrics = factory()
    metrics.set(metric_names.LIVE_CALLS, 3)
    assert f"{LIVE_CALLS_METRIC} 3" in metrics.render()
    # The node sets the gauge by that name when /metrics is read.
    assert "m.set(LIVE_CALLS," in inspect.getsource(NodeHttp.metrics)
    # Prometheus scrapes it from the node pods, which gives the series their pod label.
    node = _one(render.render(K8S / "base"), "StatefulSet", "callmesh-node")["spec"]["template"]
    annotations = node["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    ports = {p["containerPort"] for p in node["spec"]["containers"][0]["ports"]}
    assert int(annotations["prometheus.io/port"]) in ports

    rules = _values("prometheus-adapter-values.yaml")["rules"]
    assert rules["default"] is False
    (rule,) = rules["custom"]
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert series is not None and series[1] == LIVE_CALLS_METRIC
    assert set(series[2].split(",")) == {'namespace!=""', 'pod!=""'}
    assert re.fullmatch(rule["name"]["matches"], LIVE_CALLS_METRIC)
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for field_name in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert field_name in rule["metricsQuery"]
    # The chart runs these rules through Helm's tpl.
    assert "{{" not in yaml.safe_dump(rule)
    # The HPA asks for the name the adapter serves.
    hpa = _one(render.render(K8S / "base"), "HorizontalPodAutoscaler", "callmesh-node")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == LIVE_CALLS_METRIC


# ---------------------------------------------------------------- the renderer itself


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels"):
        render.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "secretGenerator:\n  - name: s\n    literals: [A=1]\n"
    )
    with pytest.raises(render.RenderError, match="disableNameSuffixHash"):
        render.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap, name: c}\n"
        "    patch: '{metadata: {labels: {a: b}}}'\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    with pytest.raises(render.RenderError, match="JSON 6902"):
        render.render(tmp_path)


def test_renderer_applies_json_patches_namespace_and_images(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text(
        "resources: [d.yaml]\nlabels:\n  - pairs: {team: voice}\n"
    )
    (base / "d.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "d"},
                "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "app"}]}}},
            }
        )
    )
    (tmp_path / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [base]\n"
        "images:\n  - {name: app, newName: reg.example/app, newTag: '1.2'}\n"
        "patches:\n  - target: {kind: Deployment, name: d}\n    patch: |-\n"
        "      - {op: add, path: /spec/replicas, value: 4}\n"
        "      - op: add\n        path: /spec/template/spec/containers/-\n"
        "        value: {name: s, image: app:0}\n"
    )
    (d,) = render.render(tmp_path)
    assert d["metadata"] == {"name": "d", "namespace": "ns", "labels": {"team": "voice"}}
    assert d["spec"]["replicas"] == 4
    images = [c["image"] for c in d["spec"]["template"]["spec"]["containers"]]
    assert images == ["reg.example/app:1.2", "reg.example/app:1.2"]
