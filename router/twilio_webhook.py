"""Twilio's voice webhook: answer an incoming call with TwiML that streams it to callmesh.

``POST /v1/twilio/voice[?tenant=T]`` (form-encoded ``CallSid``, ``From``, ``To``...) answers

    <Response><Connect action="https://PUBLIC/v1/twilio/action?tenant=T" method="POST">
      <Stream url="wss://PUBLIC/v1/twilio/media">
        <Parameter name="token" value="<stream token>"/>
      </Stream></Connect></Response>

The request must carry a valid ``X-Twilio-Signature`` (:mod:`callmesh.auth.twilio`),
checked over the public URL from configuration (``CALLMESH_PUBLIC_URL``, query string
included, so ``?tenant=`` is signed too), never over one rebuilt from ``Host``; only in
explicit development mode (``CALLMESH_DEV_MODE=1``) without ``TWILIO_AUTH_TOKEN`` are
unsigned requests answered. The stream token is a short-lived HS256 token bound to the
``CallSid``, carrying the tenant and the signed ``From``: Twilio hands it back in the
media stream's ``start.customParameters`` (``router.twilio``), so neither can be
chosen by whoever opens a stream.

A stream can end while its call goes on: its router died or drained. Twilio then requests
the ``<Connect action>`` (``POST /v1/twilio/action``, signed like the webhook), and any
router answers from the call's state in Redis (its checkpoint, keyed by tenant and
``CallSid``): a checkpoint whose status is ``ended`` (the node ended the call: hangup or
``call_ended``) gets ``<Hangup/>``; anything else (an active checkpoint, or none yet: the
stream died before the call's first checkpoint) gets a ``<Connect><Stream>`` again whose
stream token is marked as a resume (shorter-lived): only such a token lets a second stream
take the live call over, so a replayed first-stream token is still refused. The new
stream's ``start`` (same ``callSid``) resumes the call on its owner node from its
checkpoint. Redis unreachable answers a new stream too: a retry costs a short gap, a wrong
hang-up costs the call. A ``CallStatus`` that says the call is over gets ``<Hangup/>``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlencode
from xml.sax.saxutils import escape

from aiohttp import web

from callmesh.auth import TwilioSignatureInvalid
from callmesh.auth.twilio import (
    RESUME_STREAM_TOKEN_TTL_S,
    SIGNATURE_HEADER,
    STREAM_TOKEN_PARAMETER,
    caller_id,
    mint_stream_token,
    verify_request,
)
from callmesh.config import RouterConfig
from callmesh.metric_names import (
    TWILIO_ACTION_HANGUP,
    TWILIO_ACTION_RESUMED,
    TWILIO_WEBHOOK_BAD_SIGNATURE,
    TWILIO_WEBHOOK_CALLS,
    TWILIO_WEBHOOK_NO_TENANT,
    TWILIO_WEBHOOK_NOT_CONFIGURED,
)
from callmesh.protocol import valid_id
from callmesh.telemetry import Metrics
from state_store.errors import StateStoreError
from state_store.store import StateStore

log = logging.getLogger("callmesh.router.twilio")

MEDIA_PATH = "/v1/twilio/media"
VOICE_PATH = "/v1/twilio/voice"
ACTION_PATH = "/v1/twilio/action"
# Twilio's CallStatus values of a call that is over: nothing to reconnect.
_CALL_OVER = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
HANGUP_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>'


@dataclass(frozen=True, slots=True)
class _Signed:
    """A signed webhook request: what the TwiML is built from."""

    base: str
    tenant: str
    call_sid: str
    caller: str
    status: object


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


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


async def voice_webhook(
    request: web.Request, config: RouterConfig, metrics: Metrics, stream_key: str | None
) -> web.Response:
    checked = await _checked(request, config, metrics)
    if isinstance(checked, web.Response):
        return checked
    metrics.inc(TWILIO_WEBHOOK_CALLS)
    return _stream_twiml(checked, stream_key)


async def action_webhook(
    request: web.Request,
    config: RouterConfig,
    metrics: Metrics,
    store: StateStore,
    stream_key: str | None,
) -> web.Response:
    """The ``<Connect action>``: a new (resuming) stream for a call that goes on, else
    ``<Hangup/>``."""
    checked = await _checked(request, config, metrics)
    if isinstance(checked, web.Response):
        return checked
    if await _call_over(store, checked.tenant, checked.call_sid, checked.status):
        metrics.inc(TWILIO_ACTION_HANGUP)
        return web.Response(text=HANGUP_TWIML, content_type="text/xml")
    metrics.inc(TWILIO_ACTION_RESUMED)
    # The new stream numbers its frames above the lost one's (router.twilio).
    return _stream_twiml(checked, stream_key, seq_base=str(time.time_ns() // 1000))


async def _call_over(store: StateStore, tenant: str, call_sid: str, status: object) -> bool:
    if isinstance(status, str) and status.lower() in _CALL_OVER:
        return True
    try:
        ckpt = await store.load(tenant, call_sid)
    except StateStoreError:
        return False  # see the module doc: a retried stream beats a wrong hang-up
    return ckpt is not None and ckpt.status == "ended"


def _stream_twiml(signed: _Signed, stream_key: str | None, seq_base: str = "") -> web.Response:
    scheme, _, rest = signed.base.partition("://")
    stream_url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}{MEDIA_PATH}"
    action_url = f"{signed.base}{ACTION_PATH}?{urlencode({'tenant': signed.tenant})}"
    if stream_key is None:  # authentication explicitly disabled
        params = {"tenant": signed.tenant, "caller": signed.caller}
    elif seq_base:
        # A resume: the only token that lets a second stream take the live call over.
        token = mint_stream_token(
            stream_key,
            signed.call_sid,
            signed.tenant,
            signed.caller,
            RESUME_STREAM_TOKEN_TTL_S,
            resume=True,
        )
        params = {STREAM_TOKEN_PARAMETER: token}
    else:
        token = mint_stream_token(stream_key, signed.call_sid, signed.tenant, signed.caller)
        params = {STREAM_TOKEN_PARAMETER: token}
    if seq_base:
        params["seq_base"] = seq_base
    body = twiml(stream_url, params, action_url)
    return web.Response(text=body, content_type="text/xml")


async def _checked(
    request: web.Request, config: RouterConfig, metrics: Metrics
) -> _Signed | web.Response:
    """What a signed webhook request asks for, or the refusal."""
    base = config.public_url.rstrip("/")
    if not base:
        metrics.inc(TWILIO_WEBHOOK_NOT_CONFIGURED)
        return _text(503, "set CALLMESH_PUBLIC_URL: the stream URL and signatures use it")
    form = await request.post()
    params = [(k, v) for k, v in form.items() if isinstance(v, str)]
    if config.twilio_auth_token:
        try:
            verify_request(
                config.twilio_auth_token,
                base + request.path_qs,
                params,
                request.headers.get(SIGNATURE_HEADER),
            )
        except TwilioSignatureInvalid as exc:
            metrics.inc(TWILIO_WEBHOOK_BAD_SIGNATURE)
            log.warning("Twilio webhook refused", extra={"fields": {"why": str(exc)}})
            return _text(403, str(exc))
    elif not config.dev_mode:
        metrics.inc(TWILIO_WEBHOOK_NOT_CONFIGURED)
        return _text(403, "set TWILIO_AUTH_TOKEN: unsigned webhooks pass only in development mode")
    tenant = request.query.get("tenant") or config.twilio_default_tenant
    if not valid_id(tenant):
        metrics.inc(TWILIO_WEBHOOK_NO_TENANT)
        return _text(
            400,
            "tenant required: add ?tenant=NAME ([A-Za-z0-9_-]{1,64}) to the webhook URL "
            "or set CALLMESH_TWILIO_TENANT",
        )
    call_sid = form.get("CallSid")
    if not isinstance(call_sid, str) or not valid_id(call_sid):
        return _text(400, "CallSid missing or not [A-Za-z0-9_-]{1,64}")
    return _Signed(base, tenant, call_sid, caller_id(form.get("From")), form.get("CallStatus"))
