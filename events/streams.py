"""JetStream stream definitions: created (or updated) idempotently at process start.

Durability is two settings: the streams' replicas (``CALLMESH_JETSTREAM_REPLICAS``) and the
NATS servers' ``jetstream { sync_interval }``. A publish is acknowledged once a quorum of
replicas has the message in its page cache, so with 3 replicas a server process dying loses
nothing acknowledged; the fsync interval only matters when machines lose power together.
Operators who run all servers in one failure domain set ``sync_interval: always`` (every
message fsynced before the ack, at a cost in publish latency); NATS's 2-minute default is
right for servers spread across zones.
"""

from __future__ import annotations

import os

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from events import subjects

# Publishes with the same Nats-Msg-Id inside this window are stored once. A failover
# republishes an outbox within about a second, so the default two minutes is ample; five
# leaves room for a Redis outage delaying the takeover.
DUPLICATE_WINDOW_S = 300.0
# Copies JetStream keeps of each stream: 3 on a 3-server NATS cluster (k8s/deps), so losing
# a server loses no effect or event; 1 for a single server (local clusters, tests).
REPLICAS_ENV = "CALLMESH_JETSTREAM_REPLICAS"


def stream_replicas(env: dict[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(REPLICAS_ENV, "1")
    if raw not in ("1", "2", "3", "4", "5"):
        raise ValueError(f"{REPLICAS_ENV} must be 1 to 5 (JetStream's limit), got {raw!r}")
    return int(raw)


def stream_configs(
    events_max_age_s: float = 7 * 24 * 3600, replicas: int | None = None
) -> list[StreamConfig]:
    num_replicas = stream_replicas() if replicas is None else replicas
    return [
        StreamConfig(
            name=subjects.EFFECTS_STREAM,
            subjects=[subjects.EFFECTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=14 * 24 * 3600.0,
            discard=DiscardPolicy.OLD,
            num_replicas=num_replicas,
        ),
        StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=[subjects.DEAD_LETTER_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=30 * 24 * 3600.0,
            num_replicas=num_replicas,
        ),
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=events_max_age_s,
            num_replicas=num_replicas,
        ),
    ]


async def ensure_streams(
    js: JetStreamContext, events_max_age_s: float = 7 * 24 * 3600, *, replicas: int | None = None
) -> None:
    """Create every stream, or update its config if it exists (many processes race here;
    an update may also change the replicas, which JetStream applies in place)."""
    for cfg in stream_configs(events_max_age_s, replicas):
        try:
            await js.add_stream(cfg)
        except BadRequestError:
            await js.update_stream(cfg)
