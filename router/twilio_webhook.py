"""Twilio's voice webhook: answer an incoming call with TwiML that streams it to callmesh.

``POST /v1/twilio/voice[?tenant=T]`` (form-encoded ``CallSid``, ``From``, ``To``...) answers

    <Response><Connect><Stream url="wss://PUBLIC/v1/twilio/media">
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
"""

from __future__ import annotations

import logging
from xml.sax.saxutils import escape

from aiohttp import web

from callmesh.auth import TwilioSignatureInvalid
from callmesh.auth.twilio import (
    SIGNATURE_HEADER,
    STREAM_TOKEN_PARAMETER,
    mint_stream_token,
    verify_request,
)
from callmesh.config import RouterConfig
from callmesh.metric_names import (
    TWILIO_WEBHOOK_BAD_SIGNATURE,
    TWILIO_WEBHOOK_CALLS,
    TWILIO_WEBHOOK_NO_TENANT,
    TWILIO_WEBHOOK_NOT_CONFIGURED,
)
from callmesh.protocol import valid_id
from callmesh.telemetry import Metrics
from router.twilio import caller_id

log = logging.getLogger("callmesh.router.twilio")

MEDIA_PATH = "/v1/twilio/media"
VOICE_PATH = "/v1/twilio/voice"


def twiml(stream_url: str, parameters: dict[str, str]) -> str:
    def attr(value: str) -> str:
        return '"' + escape(value, {'"': "&quot;"}) + '"'

    params = "".join(f"<Parameter name={attr(k)} value={attr(v)}/>" for k, v in parameters.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect><Stream url={attr(stream_url)}>{params}</Stream></Connect></Response>"
    )


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


async def voice_webhook(
    request: web.Request, config: RouterConfig, metrics: Metrics, stream_key: str | None
) -> web.Response:
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
    caller = caller_id(form.get("From"))
    scheme, _, rest = base.partition("://")
    stream_url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}{MEDIA_PATH}"
    metrics.inc(TWILIO_WEBHOOK_CALLS)
    if stream_key is None:  # authentication explicitly disabled
        parameters = {"tenant": tenant, "caller": caller}
    else:
        token = mint_stream_token(stream_key, call_sid, tenant, caller)
        parameters = {STREAM_TOKEN_PARAMETER: token}
    return web.Response(text=twiml(stream_url, parameters), content_type="text/xml")
