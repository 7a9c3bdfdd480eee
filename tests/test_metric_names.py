"""The metric names: valid Prometheus names, each spelled once."""

from __future__ import annotations

import re

from callmesh import metric_names

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _constants() -> dict[str, str]:
    return {
        k: v
        for k, v in vars(metric_names).items()
        if k.isupper() and isinstance(v, str) and not isinstance(v, metric_names.Process)
    }


def test_every_name_is_a_valid_prometheus_name() -> None:
    names = list(_constants().values())
    assert all(PROMETHEUS_NAME.match(n) for n in names), names
    labels = [label for spec in metric_names.SPECS.values() for label in spec.labels]
    assert all(PROMETHEUS_NAME.match(label) and label != "le" for label in labels), labels


def test_every_name_has_its_type_help_and_labels() -> None:
    constants = set(_constants().values())
    assert constants == set(metric_names.SPECS), "every metric is declared with its spec"
    for spec in metric_names.SPECS.values():
        assert spec.help and "\n" not in spec.help, spec
        # A value is a label, never part of the name (issue 17: fallback_llm_timeout).
        assert not spec.name.endswith("_total"), spec


def test_each_name_is_defined_once_and_spelled_as_its_constant() -> None:
    constants = _constants()
    assert len(set(constants.values())) == len(constants)
    assert all(name == value.upper() for name, value in constants.items())
