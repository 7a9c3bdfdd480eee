"""The Prometheus text exposition as tests read it, and what the dashboards and alert
rules in k8s/observability/ use of it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

OBSERVABILITY = Path(__file__).parent.parent / "k8s" / "observability"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_METRIC = re.compile(r"\bcallmesh_[a-z0-9_]+")
_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")

Exposed = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse_exposition(text: str) -> Exposed:
    """Families by name (as TYPE names them) -> label set -> value. Strict: every sample
    belongs to a family with HELP and TYPE, histogram buckets are cumulative."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    out: Exposed = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name in helps, f"TYPE before HELP: {line}"
            types[name] = kind
            out[name] = {}
        elif line:
            m = _SAMPLE.match(line)
            assert m, f"not a sample: {line!r}"
            name, labels, value = m.group(1), m.group(3) or "", float(m.group(4))
            family = name
            for part in _HISTOGRAM_PARTS:
                if name.endswith(part) and types.get(name.removesuffix(part)) == "histogram":
                    family = name.removesuffix(part)
            assert family in types, f"sample without TYPE: {line!r}"
            key = tuple(sorted(_LABEL.findall(labels)))
            if family != name:
                key = (("__part__", name.removeprefix(family)), *key)
            out[family][key] = value
    return out


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "callmesh-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def used_metrics() -> set[str]:
    """Every metric family the dashboard and the alert rules query."""
    used = set()
    for expr in dashboard_exprs() + alert_exprs():
        for name in _METRIC.findall(expr):
            for part in _HISTOGRAM_PARTS:
                if name.endswith(part):
                    name = name.removesuffix(part)
            used.add(name)
    return used


def assert_dashboards_use_only(exposed: Exposed, prefix: str) -> None:
    """Every metric of the process with ``prefix`` that the dashboards use is in its scrape."""
    wanted = {m for m in used_metrics() if m.startswith(prefix + "_")}
    assert wanted, f"the dashboards use no {prefix} metric"
    missing = wanted - set(exposed)
    assert not missing, f"{prefix} does not export {sorted(missing)}"
