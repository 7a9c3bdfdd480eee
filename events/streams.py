"""JetStream stream definitions: created (or updated) idempotently at process start."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from events import subjects

# Publishes with the same Nats-Msg-Id inside this window are stored once. A failover
# republishes an outbox within about a second, so the default two minutes is ample; five
# leaves room for a Redis outage delaying the takeover.
DUPLICATE_WINDOW_S = 300.0


def stream_configs(events_max_age_s: float = 7 * 24 * 3600) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.EFFECTS_STREAM,
            subjects=[subjects.EFFECTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=14 * 24 * 3600.0,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=[subjects.DEAD_LETTER_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=30 * 24 * 3600.0,
        ),
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=events_max_age_s,
        ),
    ]


async def ensure_streams(js: JetStreamContext, events_max_age_s: float = 7 * 24 * 3600) -> None:
    """Create every stream, or update its config if it exists (many processes race here)."""
    for cfg in stream_configs(events_max_age_s):
        try:
            await js.add_stream(cfg)
        except BadRequestError:
            await js.update_stream(cfg)
