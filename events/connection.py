"""How callmesh names and reaches NATS: one server or a cluster.

``NATS_URL`` may list several servers, comma-separated
(``nats://n1:4222,nats://n2:4222,nats://n3:4222``). nats-py gets all of them, so when the
server a process is connected to dies it reconnects to another at once instead of waiting
for that one to come back; JetStream publishes and pulls in flight meanwhile fail with a
timeout and are retried by their owners (the outbox republishes under the same
``Nats-Msg-Id``, which JetStream de-duplicates; the effects worker's unacknowledged
messages are redelivered).
"""

from __future__ import annotations


def server_urls(url: str) -> list[str]:
    """Every server of a comma-separated ``NATS_URL``."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise ValueError("NATS URL names no server")
    return urls
