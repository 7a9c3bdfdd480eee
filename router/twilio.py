"""Twilio Media Streams as a client link: Twilio's JSON events ⇄ native frames.

Inbound, every Twilio event becomes (at most) one native frame with a router-assigned,
strictly increasing ``seq``: ``start`` → ``start`` (call id = ``callSid``; tenant and
caller from the signed stream token the voice webhook put in the TwiML, presented in
``customParameters.token`` and bound to the callSid; audio mulaw/8000), ``media`` →
``audio`` (the base64 payload is forwarded as is, never decoded), ``mark`` → ``mark``,
``dtmf`` → ``dtmf``, ``stop`` → ``hangup``. A stream that replaces a lost one (the
``<Connect action>`` of ``router.twilio_webhook``) carries a stream token marked as a resume
(the only way a second stream may take a live call over) and a ``seq_base`` parameter, the
answering router's clock in µs: its frames are numbered above it, so above every frame an
earlier stream of the call sent (50 a second is far below a million), and the node, which
skips what it already applied, takes them. Outbound, only what Twilio understands is sent:
``agent_audio`` → ``media``, ``mark`` → ``mark``, ``clear`` → ``clear``; the rest is
counted and dropped.

Every message after ``start`` must name the stream's ``streamSid``; one that does not is
counted and skipped. A malformed Twilio message is counted, logged and skipped; it never
ends the call. A ``start`` that cannot make a call (a media format other than mu-law
8 kHz) closes the stream with 4400 and the reason; one without a valid stream token with
the refusal's close code (4401 / 4403). Only with authentication explicitly disabled (no
stream key) are tenant and caller taken from ``customParameters``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from aiohttp import WSMsgType, web

from callmesh import metric_names as names
from callmesh.audio.format import TELEPHONY_RATE
from callmesh.auth import AuthError
from callmesh.auth.twilio import STREAM_TOKEN_PARAMETER, caller_id, verify_stream_token
from callmesh.coalesced_writes import coalesced
from callmesh.protocol import (
    DTMF_DIGITS,
    MAX_MARK_NAME,
    AudioEncoding,
    CloseCode,
    ErrorCode,
    In,
    Inbound,
    Out,
    audio_frame,
    encode,
    read_agent_audio,
    valid_id,
)
from callmesh.telemetry import Metrics

log = logging.getLogger("callmesh.router.twilio")

# A media frame's native ``audio`` frame is formatted by hand (protocol.audio_frame): this
# is the router's hottest path, and json.dumps of the dict costs several times more.
_AUDIO = In.AUDIO.value

TWILIO_ENCODING = "audio/x-mulaw"
TWILIO_SAMPLE_RATE = TELEPHONY_RATE  # Twilio Media Streams are 8 kHz mu-law
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# A media message exactly as Twilio writes it (its key order, no spaces, nothing escaped):
# validated and taken apart in one pass, without building the JSON object. It is most of
# the router's input (50 a second per call); any other spelling goes through json.loads.
_MEDIA = re.compile(
    r'\{"event":"media","sequenceNumber":"[0-9]{1,20}","media":\{"track":"[a-z_]{1,16}",'
    r'"chunk":"[0-9]{1,20}","timestamp":"([0-9]{1,15})","payload":"([A-Za-z0-9+/]+={0,2})"\},'
    r'"streamSid":"([A-Za-z0-9_-]{1,64})"\}'
)
# Up to 10^17: within the native protocol's seq bound with room for a long call.
_SEQ_BASE = re.compile(r"[0-9]{1,17}")


class _Refused(Exception):
    """A Twilio ``start`` that cannot become a call."""

    def __init__(self, reason: str, code: int = CloseCode.BAD_REQUEST) -> None:
        super().__init__(reason)
        self.code = code


class TwilioLink:
    """One Twilio Media Streams WebSocket. Implements :class:`router.links.ClientLink`."""

    kind = "twilio"

    def __init__(
        self,
        ws: web.WebSocketResponse,
        metrics: Metrics,
        max_frame_bytes: int,
        stream_key: str | None = None,
    ) -> None:
        self.ws = ws
        # 50 media frames a second per call: what one loop iteration sends leaves in one write.
        self.writes = coalesced(ws)
        # Checks the stream token (None: authentication explicitly disabled).
        self._stream_key = stream_key
        # Whether this stream may take over a live call: only one whose token the
        # ``<Connect action>`` minted as a resume (a replayed first-stream token may not).
        self.resumable = False
        self.call_id = ""
        self.stream_sid = ""
        self.malformed = 0
        self._metrics = metrics
        self._max_frame_bytes = max_frame_bytes
        self._seq = 0
        self._received = 0
        self._checked = 0
        self._started = False
        self._stopped = False
        self._media_prefix = ""
        self._clear = ""
        self._marks_out = 0  # marks sent and not yet echoed: audio still playing
        self._last_agent_audio = 0.0

    def __repr__(self) -> str:
        return (
            f"<TwilioLink {self.call_id or '-'} stream={self.stream_sid or '-'} "
            f"seq={self._seq} malformed={self.malformed} closed={self.ws.closed}>"
        )

    @property
    def closed(self) -> bool:
        return self.ws.closed

    # ------------------------------------------------------------------ Twilio → node

    async def receive(self) -> Inbound | None:
        ws = self.ws
        while True:
            msg = await ws.receive()
            self._received += 1
            if msg.type is WSMsgType.TEXT:
                try:
                    inbound = self.translate(msg.data)
                except _Refused as exc:
                    await self._refuse_call(str(exc), exc.code)
                    return None
                if inbound is not None:
                    return inbound
            elif msg.type is WSMsgType.BINARY:
                self._malformed("binary frame")
            else:
                return None

    def idle_since_last_check(self) -> bool:
        """True when no message arrived since the previous call."""
        idle = self._received == self._checked
        self._checked = self._received
        return idle

    def translate(self, data: str) -> Inbound | None:
        """One Twilio message → the native frame it means (None: nothing to forward)."""
        if len(data) > self._max_frame_bytes:
            return self._malformed(f"message of {len(data)} bytes")
        if self._started and not self._stopped:
            exact = _MEDIA.fullmatch(data)
            if exact is not None:
                if exact[3] != self.stream_sid:
                    return self._other_stream()
                return self._audio(exact[2], int(exact[1]))
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):
            return self._malformed("not JSON")
        if type(msg) is not dict:
            return self._malformed("not an object")
        event = msg.get("event")
        if self._started and event != "connected" and msg.get("streamSid") != self.stream_sid:
            return self._other_stream()
        if event == "media":  # the hot path: 50 a second per call
            if not self._started or self._stopped:
                self._metrics.inc(names.TWILIO_MEDIA_OUTSIDE_STREAM)
                return None
            media = msg.get("media")
            payload = media.get("payload") if type(media) is dict else None
            if type(payload) is not str or _B64.fullmatch(payload) is None:
                return self._malformed("media without a base64 payload")
            return self._audio(payload, _timestamp(media.get("timestamp")))  # type: ignore[union-attr]
        if event == "start":
            return self._start(msg)
        if event == "connected":
            return None
        if event not in ("mark", "dtmf", "stop"):
            self._metrics.inc(names.TWILIO_UNKNOWN_EVENTS)
            log.debug("unknown Twilio event", extra={"fields": {"call_id": self.call_id}})
            return None
        if not self._started or self._stopped:
            self._metrics.inc(names.TWILIO_EVENTS_OUTSIDE_STREAM)
            return None
        if event == "mark":
            mark = msg.get("mark")
            name = mark.get("name") if type(mark) is dict else None
            if type(name) is not str or not 0 < len(name) <= MAX_MARK_NAME:
                return self._malformed("mark without a name")
            self._marks_out = max(0, self._marks_out - 1)
            return self._frame(In.MARK, name=name)
        if event == "dtmf":
            dtmf = msg.get("dtmf")
            digit = dtmf.get("digit") if type(dtmf) is dict else None
            if type(digit) is not str or digit not in DTMF_DIGITS:
                return self._malformed("dtmf without a valid digit")
            return self._frame(In.DTMF, digit=digit)
        self._stopped = True
        return self._frame(In.HANGUP)

    def _audio(self, payload: str, ts: int | None) -> Inbound:
        self._seq = seq = self._seq + 1
        if ts is None:
            body = {"type": _AUDIO, "seq": seq, "data": payload}
        else:
            body = {"type": _AUDIO, "seq": seq, "data": payload, "ts": ts}
        return Inbound(In.AUDIO, seq, body, audio_frame(seq, payload, ts))

    def _start(self, msg: dict[str, Any]) -> Inbound | None:
        if self._started:
            self._metrics.inc(names.TWILIO_DUPLICATE_STARTS)
            return None
        start = msg.get("start")
        if type(start) is not dict:
            raise _Refused("start event without a 'start' object")
        call_sid = start.get("callSid")
        if not valid_id(call_sid):
            raise _Refused("start.callSid missing or not [A-Za-z0-9_-]{1,64}")
        stream_sid = msg.get("streamSid") or start.get("streamSid")
        if not valid_id(stream_sid):
            raise _Refused("streamSid missing or not [A-Za-z0-9_-]{1,64}")
        params = start.get("customParameters") or {}
        if type(params) is not dict:
            raise _Refused("start.customParameters must be an object")
        tenant, caller = self._identity(params, str(call_sid))
        fmt = start.get("mediaFormat")
        if fmt is not None and (
            type(fmt) is not dict
            or fmt.get("encoding") != TWILIO_ENCODING
            or fmt.get("sampleRate") != TWILIO_SAMPLE_RATE
            or fmt.get("channels", 1) != 1
        ):
            raise _Refused(f"mediaFormat must be {TWILIO_ENCODING}, 8000 Hz, mono; got {fmt!r}")
        self.call_id, self.stream_sid = str(call_sid), str(stream_sid)
        self._started = True
        base = params.get("seq_base")
        if type(base) is str and _SEQ_BASE.fullmatch(base):
            self._seq = int(base)
        self._media_prefix = f'{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"'
        self._clear = encode({"event": "clear", "streamSid": stream_sid})
        return self._frame(
            In.START,
            tenant=tenant,
            caller=caller,
            audio={"encoding": AudioEncoding.MULAW.value, "sample_rate": TWILIO_SAMPLE_RATE},
        )

    def _identity(self, params: dict[str, Any], call_sid: str) -> tuple[str, str]:
        """Tenant and caller of the stream: from its signed token, bound to the callSid
        (the webhook verified Twilio's signature over ``From`` before minting it)."""
        if self._stream_key is None:
            tenant = params.get("tenant")
            if not valid_id(tenant):
                raise _Refused("customParameters.tenant missing or not [A-Za-z0-9_-]{1,64}")
            caller = caller_id(params.get("caller") or params.get("From") or params.get("from"))
            return str(tenant), caller
        try:
            grant = verify_stream_token(
                self._stream_key, params.get(STREAM_TOKEN_PARAMETER), call_sid
            )
        except AuthError as exc:
            raise _Refused(exc.refusal.reason, exc.refusal.close_code) from exc
        self.resumable = grant.resume
        return grant.tenant, grant.caller

    def _other_stream(self) -> Inbound | None:
        """A message naming another stream than this one's: never acted on."""
        self._metrics.inc(names.TWILIO_STREAM_SID_MISMATCH)
        return self._malformed("streamSid is not this stream's")

    def _frame(self, kind: In, **fields: Any) -> Inbound:
        self._seq += 1
        body = {"type": kind.value, "seq": self._seq, **fields}
        return Inbound(kind, self._seq, body, encode(body))

    def _malformed(self, why: str) -> Inbound | None:
        self.malformed += 1
        self._metrics.inc(names.TWILIO_MALFORMED_MESSAGES)
        # The first one per stream is worth a look; a flood of them is worth a counter.
        level = logging.WARNING if self.malformed == 1 else logging.DEBUG
        fields = {"call_id": self.call_id, "why": why}
        log.log(level, "malformed Twilio message", extra={"fields": fields})
        return None

    async def _refuse_call(self, reason: str, code: int = CloseCode.BAD_REQUEST) -> None:
        self._metrics.inc(names.TWILIO_STREAMS_REFUSED)
        log.warning("Twilio stream refused", extra={"fields": {"reason": reason}})
        await self.close(code, reason.encode()[:120])

    # ------------------------------------------------------------------ node → Twilio

    async def send(
        self, kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None
    ) -> None:
        if kind == Out.AGENT_AUDIO:
            # ``data`` comes read from the template spelling, which the router routes
            # unparsed (router.upstream): checked there for anything that would need escaping.
            if data is None and (data := _agent_audio_data(raw, frame)) is None:
                self._metrics.inc(names.TWILIO_BAD_AGENT_AUDIO)
                return
            await self.ws.send_str(self._media_prefix + data + '"}}')
            self._last_agent_audio = time.monotonic()
        elif kind == Out.MARK:
            self._marks_out += 1
            name = (frame if frame is not None else json.loads(raw)).get("name")
            msg = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
            await self.ws.send_str(encode(msg))
        elif kind == Out.CLEAR:
            self._marks_out = 0  # Twilio echoes every pending mark at once
            await self.ws.send_str(self._clear)
        else:
            # Twilio has no use for text, metrics, ready, errors...: they stay here.
            self._metrics.inc(names.TWILIO_FRAMES_NOT_FORWARDED)
            if kind == Out.ERROR:
                fields = {"call_id": self.call_id, "frame": raw[:200]}
                log.info("node error on a Twilio call", extra={"fields": fields})

    async def refuse(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        self._metrics.inc(names.TWILIO_REFUSED, code=code.value)
        log.info(
            "frame refused on a Twilio call",
            extra={"fields": {"call_id": self.call_id, "code": code.value, "message": message}},
        )

    async def close(self, code: int, message: bytes = b"") -> None:
        await self.ws.close(code=code, message=message)

    def quiet(self, settle_s: float = 0.3) -> bool:
        """Nothing of the agent's is playing or on its way (every mark echoed, no audio for
        ``settle_s``): ending the stream now, for a drain, cuts no reply short."""
        return self._marks_out == 0 and time.monotonic() - self._last_agent_audio > settle_s


def _agent_audio_data(raw: str, frame: dict[str, Any] | None) -> str | None:
    """The data of an ``agent_audio`` frame the router did not read for this send (parsed,
    or held in the template spelling by router.failover_buffer and sent again after a
    ``clear``); None when it cannot be spliced into a ``media`` message."""
    if frame is None:
        fast = read_agent_audio(raw)
        if fast is not None:
            return fast[2]
        frame = json.loads(raw)
    data = frame.get("data")
    # Spliced into JSON unescaped: node base64 never holds a quote or backslash.
    if type(data) is not str or '"' in data or "\\" in data:
        return None
    return data


def _timestamp(value: object) -> int | None:
    """Twilio's ``media.timestamp`` (ms since the stream started, a string) as an int."""
    if type(value) is str and value.isascii() and value.isdigit() and len(value) < 16:
        return int(value)
    if type(value) is int and value >= 0:
        return value
    return None
