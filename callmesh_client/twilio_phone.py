"""What Twilio does around a media stream, for simulated phone calls: the voice webhook,
the TwiML it answers, and ``<Connect action>`` when a stream ends (../shared/PROTOCOLS.md).

A call starts with the voice webhook (``POST``, Twilio's standard voice parameters, signed
with ``X-Twilio-Signature`` when an auth token is given); the TwiML's ``<Connect><Stream>``
names the media WebSocket and its ``<Parameter>``s (they arrive in ``start.customParameters``).
When that stream ends without the caller hanging up, Twilio requests the ``<Connect>``'s
``action`` (same parameters, ``CallStatus=in-progress``) and executes the TwiML it gets: a
new ``<Connect><Stream>`` re-opens the media (new ``streamSid``, same ``CallSid``),
``<Hangup/>`` ends the call; with no ``action`` the call ends too (nothing after
``<Connect>``).

The public URL in the TwiML is whatever router answered; in production a load balancer
sends each request to a live router. :class:`TwilioPhone` plays that part too: a request or
WebSocket goes to the first router of its list that has not refused one lately (a router
that is down, or answers 503 while draining, is passed over for :data:`REFUSED_FOR_S`, as a
load balancer's health check would), then to the URL as given, then to the routers that
refused; with a short pause once all were tried, for at most ``give_up_after_s``.
"""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from callmesh.auth.twilio import request_signature
from callmesh_client.voice_wire import TwilioWire

T = TypeVar("T")
Stream = tuple[aiohttp.ClientWebSocketResponse, TwilioWire]

VOICE_PATH = "/v1/twilio/voice"
# How long a router that refused a request is tried last (s).
REFUSED_FOR_S = 10.0


class TwilioCallEnded(Exception):
    """The TwiML ended the call (``<Hangup/>``, or nothing after ``<Connect>``)."""


@dataclass(frozen=True)
class Connect:
    """A ``<Connect><Stream>`` verb: where the media goes and what happens after it."""

    stream_url: str
    parameters: dict[str, str]
    action: str = ""


def parse_twiml(text: str) -> Connect | None:
    """The ``<Connect><Stream>`` of a TwiML answer; None for ``<Hangup/>`` or no stream."""
    root = ET.fromstring(text)
    if root.tag != "Response":
        raise ValueError(f"TwiML root is {root.tag!r}, not Response")
    for verb in root:
        if verb.tag == "Hangup":
            return None
        if verb.tag == "Connect":
            stream = verb.find("Stream")
            if stream is None or not stream.get("url"):
                raise ValueError("<Connect> without a <Stream url>")
            params = {
                str(p.get("name")): str(p.get("value", ""))
                for p in stream.findall("Parameter")
                if p.get("name")
            }
            return Connect(str(stream.get("url")), params, verb.get("action", ""))
    return None


@dataclass
class TwilioPhone:
    """One phone call as Twilio places it. ``routers``: base URLs behind the 'load balancer'."""

    routers: Sequence[str]
    call_sid: str
    tenant: str
    caller: str = "+14155550100"
    auth_token: str = ""
    give_up_after_s: float = 30.0
    streams: int = 0  # streams opened (1 + every resume through the action)
    stream_base: str = ""  # the router (base URL) the current stream goes through
    account_sid: str = field(default_factory=lambda: "AC" + uuid.uuid4().hex)
    _action: str = ""
    _last_url: str = ""
    # Routers (base URLs) that refused a request, and when (loop time).
    _refused: dict[str, float] = field(default_factory=dict)

    def _form(self) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "CallSid": self.call_sid,
            "From": self.caller,
            "To": "+14155550199",
            "CallStatus": "in-progress",
            "Direction": "inbound",
        }

    async def dial(self, http: aiohttp.ClientSession) -> Stream:
        """The voice webhook, then the stream its TwiML names."""
        query = urlencode({"tenant": self.tenant})
        return await self._follow(http, f"{self.routers[0].rstrip('/')}{VOICE_PATH}?{query}")

    async def after_stream(self, http: aiohttp.ClientSession) -> Stream | None:
        """The stream ended while the call goes on: the ``action``'s new stream, or None
        when the TwiML hangs up."""
        if not self._action:
            return None
        try:
            return await self._follow(http, self._action)
        except TwilioCallEnded:
            return None

    async def _follow(self, http: aiohttp.ClientSession, url: str) -> Stream:
        twiml = await self._balanced(lambda u: self._post(http, u), url)
        connect = parse_twiml(twiml)
        if connect is None:
            raise TwilioCallEnded(url)
        self._action = connect.action
        ws = await self._balanced(lambda u: http.ws_connect(u, compress=0), connect.stream_url)
        self.streams += 1
        self.stream_base = _base(self._last_url)
        # The stream's own parameters, exactly as the TwiML gave them.
        return ws, TwilioWire(self.call_sid, self.tenant, self.caller, connect.parameters)

    async def _post(self, http: aiohttp.ClientSession, url: str) -> str:
        form = self._form()
        headers = {}
        if self.auth_token:
            headers["X-Twilio-Signature"] = request_signature(self.auth_token, url, form.items())
        async with http.post(url, data=form, headers=headers) as resp:
            if resp.status >= 500:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="router unavailable"
                )
            resp.raise_for_status()
            return await resp.text()

    async def _balanced(self, attempt: Callable[[str], Awaitable[T]], url: str) -> T:
        """``attempt(url)`` through the 'load balancer': to the routers that have not
        refused lately, the URL as given, then those that did; the same request to the
        next one when it is refused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_after_s
        while True:
            now = loop.time()
            routed = [_rebase(url, r) for r in self.routers]
            refused = [u for u in routed if now - self._refused.get(_base(u), -1e9) < REFUSED_FOR_S]
            healthy = [u for u in routed if u not in refused]
            for candidate in dict.fromkeys([*healthy, url, *refused]):
                try:
                    result = await attempt(candidate)
                    self._last_url = candidate
                    return result
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    self._refused[_base(candidate)] = loop.time()
                    last = exc
            if loop.time() > deadline:
                raise last
            await asyncio.sleep(0.1)


def _base(url: str) -> str:
    """``http://host:port`` of a router URL (ws or http)."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    return f"{scheme}://{parts.netloc}"


def _rebase(url: str, base: str) -> str:
    """``url`` sent to the router at ``base`` instead (same path and query)."""
    parts, target = urlsplit(url), urlsplit(base)
    scheme = parts.scheme
    if scheme in ("ws", "wss"):
        scheme = "wss" if target.scheme == "https" else "ws"
    else:
        scheme = target.scheme
    return urlunsplit(parts._replace(scheme=scheme, netloc=target.netloc))
