"""Twilio's voice webhook: answer an incoming call with TwiML that streams it to callmesh.

``POST /v1/twilio/voice[?tenant=T]`` (form-encoded ``CallSid``, ``From``, ``To``...) answers

    <Response><Connect action="https://HOST/v1/twilio/action?tenant=T" method="POST">
      <Stream url="wss://HOST/v1/twilio/media">
        <Parameter name="tenant" value="T"/><Parameter name="caller" value="14155550100"/>
      </Stream></Connect></Response>

Twilio then opens the media stream (``router.twilio``) with both parameters in
``start.customParameters``. When an auth token is configured, the request must carry a
valid ``X-Twilio-Signature``: base64(HMAC-SHA1(token, URL + each POST parameter's name
and value, sorted by name)), where URL is the full URL Twilio requested.

A stream can end while its call goes on: its router died or drained. Twilio then requests
the ``<Connect action>`` (``POST /v1/twilio/action``, signed like the webhook), and any
router answers from the call's state in Redis (its checkpoint, keyed by tenant and
``CallSid``): a checkpoint whose status is ``ended`` (the node ended the call: hangup or
``call_ended``) gets ``<Hangup/>``; anything else (an active checkpoint, or none yet: the
stream died before the call's first checkpoint) gets the same ``<Connect><Stream>`` again,
and the new stream's ``start`` (same ``callSid``) resumes the call on its owner node from
its checkpoint. Redis unreachable answers a new stream too: a retry costs a short gap, a
wrong hang-up costs the call. A ``CallStatus`` that says the call is over gets ``<Hangup/>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape

from aiohttp import web

from callmesh.config import RouterConfig
from callmesh.metric_names import (
    TWILIO_ACTION_HANGUP,
    TWILIO_ACTION_RESUMED,
    TWILIO_WEBHOOK_BAD_SIGNATURE,
    TWILIO_WEBHOOK_CALLS,
    TWILIO_WEBHOOK_NO_TENANT,
)
from callmesh.protocol import valid_id
from callmesh.telemetry import Metrics
from router.twilio import caller_id
from state_store.errors import StateStoreError
from state_store.store import StateStore

MEDIA_PATH = "/v1/twilio/media"
VOICE_PATH = "/v1/twilio/voice"
ACTION_PATH = "/v1/twilio/action"
# Twilio's CallStatus values of a call that is over: nothing to reconnect.
_CALL_OVER = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
HANGUP_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>'
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


def _attr(value: str) -> str:
    return '"' + escape(value, {'"': "&quot;"}) + '"'


def twiml(stream_url: str, parameters: dict[str, str], action_url: str = "") -> str:
    params = "".join(
        f"<Parameter name={_attr(k)} value={_attr(v)}/>" for k, v in parameters.items()
    )
    action = f' action={_attr(action_url)} method="POST"' if action_url else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect{action}><Stream url={_attr(stream_url)}>{params}</Stream>"
        "</Connect></Response>"
    )


async def voice_webhook(
    request: web.Request, config: RouterConfig, metrics: Metrics
) -> web.Response:
    checked = await _checked(request, config, metrics)
    if isinstance(checked, web.Response):
        return checked
    tenant, form, base = checked
    metrics.inc(TWILIO_WEBHOOK_CALLS)
    return _stream_twiml(base, tenant, form)


async def action_webhook(
    request: web.Request, config: RouterConfig, metrics: Metrics, store: StateStore
) -> web.Response:
    """The ``<Connect action>``: a new stream for a call that goes on, else ``<Hangup/>``."""
    checked = await _checked(request, config, metrics)
    if isinstance(checked, web.Response):
        return checked
    tenant, form, base = checked
    call_sid = form.get("CallSid")
    if not valid_id(call_sid):
        return web.Response(
            status=400,
            text="CallSid missing or not [A-Za-z0-9_-]{1,64}\n",
            content_type="text/plain",
        )
    if await _call_over(store, tenant, str(call_sid), form.get("CallStatus")):
        metrics.inc(TWILIO_ACTION_HANGUP)
        return web.Response(text=HANGUP_TWIML, content_type="text/xml")
    metrics.inc(TWILIO_ACTION_RESUMED)
    # The new stream numbers its frames above the lost one's (router.twilio).
    return _stream_twiml(base, tenant, form, seq_base=str(time.time_ns() // 1000))


async def _call_over(store: StateStore, tenant: str, call_sid: str, status: object) -> bool:
    if isinstance(status, str) and status.lower() in _CALL_OVER:
        return True
    try:
        ckpt = await store.load(tenant, call_sid)
    except StateStoreError:
        return False  # see the module doc: a retried stream beats a wrong hang-up
    return ckpt is not None and ckpt.status == "ended"


def _stream_twiml(base: str, tenant: str, form: Any, seq_base: str = "") -> web.Response:
    scheme, _, rest = base.partition("://")
    stream_url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}{MEDIA_PATH}"
    action_url = f"{base}{ACTION_PATH}?{urlencode({'tenant': tenant})}"
    params = {"tenant": tenant, "caller": caller_id(form.get("From"))}
    if seq_base:
        params["seq_base"] = seq_base
    body = twiml(stream_url, params, action_url)
    return web.Response(text=body, content_type="text/xml")


async def _checked(
    request: web.Request, config: RouterConfig, metrics: Metrics
) -> tuple[str, Any, str] | web.Response:
    """(tenant, form, public base) of a signed webhook request, or the refusal."""
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
    return tenant, form, base
