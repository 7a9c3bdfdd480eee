"""The metric names: valid Prometheus names, each spelled once."""

from __future__ import annotations

import re

from callmesh import metric_names

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _constants() -> dict[str, str]:
    return {k: v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)}


def test_every_name_is_a_valid_prometheus_name() -> None:
    names = [
        *_constants().values(),
        metric_names.gc_collections(2),
        metric_names.fallback("llm_timeout"),
        metric_names.relinks("failover"),
        metric_names.client_errors("bad_seq"),
        metric_names.twilio_refused("bad_message"),
    ]
    assert all(PROMETHEUS_NAME.match(n) for n in names), names


def test_each_name_is_defined_once_and_spelled_as_its_constant() -> None:
    constants = _constants()
    assert len(set(constants.values())) == len(constants)
    assert all(name == value.upper() for name, value in constants.items())
