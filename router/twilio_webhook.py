"""Twilio's voice webhook: answer an incoming call with TwiML that streams it to callmesh.

``POST /v1/twilio/voice[?tenant=T]`` (form-encoded ``CallSid``, ``From``, ``To``...) answers

    <Response><Connect><Stream url="wss://HOST/v1/twilio/media">
      <Parameter name="tenant" value="T"/><Parameter name="caller" value="14155550100"/>
    </Stream></Connect></Response>

Twilio then opens the media stream (``router.twilio``) with both parameters in
``start.customParameters``. When an auth token is configured, the request must carry a
valid ``X-Twilio-Signature``: base64(HMAC-SHA1(token, URL + each POST parameter's name
and value, sorted by name)), where URL is the full URL Twilio requested.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import escape

from aiohttp import web

from callmesh.config import RouterConfig
from callmesh.metric_names import (
    TWILIO_WEBHOOK_BAD_SIGNATURE,
    TWILIO_WEBHOOK_CALLS,
    TWILIO_WEBHOOK_NO_TENANT,
)
from callmesh.protocol import valid_id
from callmesh.telemetry import Metrics
from router.twilio import caller_id

MEDIA_PATH = "/v1/twilio/media"
VOICE_PATH = "/v1/twilio/voice"
SIGNATURE_HEADER = "X-Twilio-Signature"


def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's request signature of a POST to ``url`` with form ``params``."""
    data = url + "".join(k + v for k, v in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def valid_signature(
    auth_token: str, url: str, params: list[tuple[str, str]], received: str
) -> bool:
    """Constant-time check; the URL is tried with and without its default port, since
    a proxy in front of us may add or strip it (Twilio's own validators do the same)."""
    ok = False
    for candidate in _port_variants(url):
        # Every candidate is compared, so the timing does not tell which one matched.
        ok |= hmac.compare_digest(signature(auth_token, candidate, params), received)
    return ok


def _port_variants(url: str) -> list[str]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is None and default is not None:
        other = f"{host}:{default}"
    elif parts.port == default:
        other = host
    else:
        return [url]
    return [url, urlunsplit(parts._replace(netloc=other))]


def public_base(request: web.Request, config: RouterConfig) -> str:
    """``https://host[/prefix]`` as clients (Twilio) see this router."""
    if config.public_url:
        return config.public_url.rstrip("/")
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return f"{proto or request.scheme}://{request.host}"


def twiml(stream_url: str, parameters: dict[str, str]) -> str:
    def attr(value: str) -> str:
        return '"' + escape(value, {'"': "&quot;"}) + '"'

    params = "".join(f"<Parameter name={attr(k)} value={attr(v)}/>" for k, v in parameters.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect><Stream url={attr(stream_url)}>{params}</Stream></Connect></Response>"
    )


async def voice_webhook(
    request: web.Request, config: RouterConfig, metrics: Metrics
) -> web.Response:
    form = await request.post()
    base = public_base(request, config)
    if config.twilio_auth_token:
        received = request.headers.get(SIGNATURE_HEADER, "")
        params = [(k, v) for k, v in form.items() if isinstance(v, str)]
        url = base + request.path_qs
        if not received or not valid_signature(config.twilio_auth_token, url, params, received):
            metrics.inc(TWILIO_WEBHOOK_BAD_SIGNATURE)
            why = "missing" if not received else "invalid"
            return web.Response(
                status=403, text=f"{SIGNATURE_HEADER} {why} for {url}\n", content_type="text/plain"
            )
    tenant = request.query.get("tenant") or config.twilio_default_tenant
    if not valid_id(tenant):
        metrics.inc(TWILIO_WEBHOOK_NO_TENANT)
        return web.Response(
            status=400,
            text="tenant required: add ?tenant=NAME ([A-Za-z0-9_-]{1,64}) to the webhook URL "
            "or set CALLMESH_TWILIO_TENANT\n",
            content_type="text/plain",
        )
    scheme, _, rest = base.partition("://")
    stream_url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}{MEDIA_PATH}"
    metrics.inc(TWILIO_WEBHOOK_CALLS)
    body = twiml(stream_url, {"tenant": tenant, "caller": caller_id(form.get("From"))})
    return web.Response(text=body, content_type="text/xml")
