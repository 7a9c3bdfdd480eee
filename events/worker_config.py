"""The effects worker's delivery policy: one frozen config, and the flags that build it.

Both live here so a new policy knob is added in one place: the field (with its default
and validation) and, if operators should set it, its name in :data:`_POLICY_FLAGS`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from callmesh import settings
from callmesh.protocol import valid_id
from callmesh.settings import flags as settings_flags
from callmesh.settings.table import WORKER
from events import subjects

DEFAULT_DURABLE: str = settings.default(WORKER, "durable")


@dataclass(frozen=True)
class WorkerConfig:
    """Delivery policy of the effects worker. Durations in seconds."""

    # Shared by every worker process that should split the same work.
    durable: str = DEFAULT_DURABLE
    # ``effects.>`` for all tenants; ``effects.{tenant}.>`` gives a tenant its own workers,
    # so one tenant's CRM outage cannot fill another tenant's ack-pending window.
    filter_subject: str = subjects.EFFECTS_SUBJECTS
    batch: int = 32
    concurrency: int = 64
    max_deliveries: int = 10
    # How long JetStream waits for an ack before handing the message to another worker;
    # each sink attempt is cut off before it, so a slow CRM does not cause parallel repeats.
    ack_wait_s: float = 30.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    # An effect older than this (since its first publish) is dead-lettered, not retried.
    deadline_s: float = 24 * 3600.0
    # Consumer-wide cap on delivered-but-unacked messages, including backed-off ones.
    max_ack_pending: int = 10_000
    fetch_timeout_s: float = 1.0
    drain_timeout_s: float = 20.0
    # Append EFFECT_DELIVERY records to the call's event log (for replay).
    log_events: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if not valid_id(self.durable):
            raise ValueError(f"durable must match [A-Za-z0-9_-]{{1,64}}, got {self.durable!r}")
        if not self.filter_subject.startswith("effects."):
            raise ValueError(f"filter_subject must be under effects., got {self.filter_subject!r}")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")

    @property
    def attempt_timeout_s(self) -> float:
        return self.ack_wait_s * 0.9


# Policy fields an operator sets with ``--field-name``, with the help text of those that
# need one. fetch_timeout_s and log_events are for tests, not operators.
_POLICY_FLAGS: dict[str, str | None] = {
    "batch": None,
    "concurrency": None,
    "max_deliveries": None,
    "ack_wait_s": None,
    "backoff_base_s": None,
    "backoff_max_s": None,
    "deadline_s": "dead-letter an effect this long after it was first published",
    "max_ack_pending": None,
    "drain_timeout_s": None,
}


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """``--tenant`` and one flag per policy field, defaulting to the field's default.
    (``--durable`` is a setting of the table: ``callmesh.settings.table``.)"""
    defaults = WorkerConfig()
    parser.add_argument("--tenant", help="deliver only this tenant's effects (effects.TENANT.>)")
    for name, help_text in _POLICY_FLAGS.items():
        default = getattr(defaults, name)
        shown = f"(default: {default})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{help_text} {shown}" if help_text else shown,
        )


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig the flags describe (raises ValueError when one is out of range)."""
    settings_flags.resolved(args)
    return WorkerConfig(
        durable=args.durable,
        filter_subject=f"effects.{args.tenant}.>" if args.tenant else subjects.EFFECTS_SUBJECTS,
        **{name: getattr(args, name) for name in _POLICY_FLAGS},
    )
