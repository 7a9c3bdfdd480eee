"""Where effects go: the :class:`Sink` protocol, an HTTP webhook sink, a logging sink.

A sink delivers one effect and reports how it went. Failures are grouped by cause so the
effects worker can decide without knowing HTTP: :class:`SinkRetryable` (the CRM is down,
slow or throttling: try again later) and :class:`SinkRejected` (the CRM refused the
effect itself: retrying cannot help, dead-letter it now).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

from callmesh.redaction import default_redactor, mask_secrets
from callmesh.settings import mask_url
from events.errors import EventsError

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
# Statuses a well-behaved API uses for "try again later"; every other 4xx is about the
# request itself and is final.
_RETRYABLE_4XX = frozenset({408, 425, 429})
# "Already applied": a CRM that dedupes by Idempotency-Key answers a repeat with 409.
_ALREADY_APPLIED = 409


@dataclass(frozen=True)
class Effect:
    """One side effect as published by the node's outbox (:func:`events.outbox.effect_entry`).
    ``id`` is ``{call_id}:{turn}:{n}``: the JetStream de-duplication id and the
    Idempotency-Key the sink sends, so every retry of one effect is recognisably the same."""

    id: str
    tenant: str
    call_id: str
    turn: int
    n: int
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, data: bytes) -> Effect:
        """Parse an effect message body; raises ValueError when it is not one."""
        try:
            d = json.loads(data)
            effect = cls(
                id=str(d["id"]),
                tenant=str(d["tenant"]),
                call_id=str(d["call_id"]),
                turn=int(d["turn"]),
                n=int(d["n"]),
                kind=str(d["kind"]),
                payload=dict(d.get("payload") or {}),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not an effect message: {exc}") from exc
        return effect

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeliveryResult:
    """A successful delivery. ``already_applied`` means the sink had seen this
    Idempotency-Key before (an earlier attempt landed but its answer was lost)."""

    status: int
    already_applied: bool = False


class SinkError(EventsError):
    """An effect could not be delivered."""

    def __init__(self, message: str, *, status: int = 0, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        # The sink's own hint (HTTP Retry-After) for when to try again, if it gave one.
        self.retry_after_s = retry_after_s


class SinkRetryable(SinkError):
    """The sink is unavailable, overloaded or slow; the same effect may succeed later."""

    retryable = True


class SinkRejected(SinkError):
    """The sink refused this effect (bad request, unknown entity...); retrying cannot help."""


class Sink(Protocol):
    """Delivers effects. Implementations must be safe to call concurrently and must treat
    ``effect.id`` as an idempotency key: the worker may deliver the same effect again."""

    async def deliver(self, effect: Effect) -> DeliveryResult:
        """Deliver one effect, or raise SinkRetryable / SinkRejected."""
        ...

    async def aclose(self) -> None:
        """Release connections; idempotent."""
        ...


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: an HTTP-date needs a clock we do not share with the CRM.
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class WebhookSink:
    """POSTs each effect as JSON to an HTTP endpoint (a CRM's API) with an
    ``Idempotency-Key`` header.

    ``url`` may contain ``{tenant}`` and ``{kind}`` placeholders, so one worker can route
    effects of several tenants or kinds to different endpoints. 2xx and 409 (already
    applied) are success; 408/425/429/5xx, timeouts and connection errors are retryable;
    any other 4xx is a rejection. The HTTP session is created on first use (never in
    ``__init__``, which may run outside an event loop) and closed by :meth:`aclose`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must be http(s)://, got {url!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = dict(headers or {})
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SinkRetryable("webhook sink is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
            )
        return self._session

    def url_for(self, effect: Effect) -> str:
        return self._url.format(tenant=effect.tenant, kind=effect.kind)

    def _where(self, effect: Effect) -> str:
        # For error messages, which reach logs and dead letters: no credentials.
        return mask_url(self.url_for(effect))

    async def deliver(self, effect: Effect) -> DeliveryResult:
        headers = {
            **self._headers,
            IDEMPOTENCY_HEADER: effect.id,
            "X-Callmesh-Tenant": effect.tenant,
            "X-Callmesh-Call": effect.call_id,
        }
        url = self.url_for(effect)
        try:
            async with self._client().post(url, json=effect.to_dict(), headers=headers) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                # Read the body so the connection goes back to the pool in a clean state.
                await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            detail = f"{type(exc).__name__}: {mask_secrets(str(exc))}"
            raise SinkRetryable(f"POST {self._where(effect)}: {detail}") from exc
        if 200 <= status < 300:
            return DeliveryResult(status)
        if status == _ALREADY_APPLIED:
            return DeliveryResult(status, already_applied=True)
        where = self._where(effect)
        if status >= 500 or status in _RETRYABLE_4XX:
            raise SinkRetryable(
                f"POST {where}: HTTP {status}", status=status, retry_after_s=retry_after
            )
        raise SinkRejected(f"POST {where}: HTTP {status}", status=status)

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await asyncio.shield(session.close())

    def __repr__(self) -> str:
        return f"<WebhookSink {mask_url(self._url)}>"


class LogSink:
    """Logs each effect instead of delivering it: for local runs with no CRM configured,
    so effects still flow through the outbox, the worker and the event log. The payload
    is redacted here, whatever handler the process logs to."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    async def deliver(self, effect: Effect) -> DeliveryResult:
        self._log.info(
            "effect %s tenant=%s call=%s kind=%s payload=%s",
            effect.id,
            effect.tenant,
            effect.call_id,
            effect.kind,
            default_redactor().redact_text(
                json.dumps(effect.payload, ensure_ascii=False, default=str)
            ),
        )
        return DeliveryResult(200)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return "<LogSink>"
