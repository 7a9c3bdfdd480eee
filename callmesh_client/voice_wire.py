"""What a simulated caller says on the wire: Twilio Media Streams or the native protocol.

Both dialects expose the same small interface to :class:`callmesh_client.voice_client.VoiceCaller`
(``opening``, ``media``, ``mark``, ``dtmf``, ``stop``, ``decode``). The Twilio dialect
speaks exactly what Twilio sends (string ``sequenceNumber``/``chunk``/``timestamp``, a
``streamSid`` on every message after ``connected``); frames are formatted by hand on the
per-frame path so that hundreds of callers fit in one benchmark process.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from callmesh.audio.format import TELEPHONY_RATE, AudioEncoding
from callmesh.protocol import In, Out, audio_frame, encode
from callmesh_client.credentials import call_token, stream_token

TWILIO_MEDIA_PATH = "/v1/twilio/media"


# What a caller hears, whichever the dialect: agent audio, a mark, a clear. Any other
# message keeps its native type (``ready``, ``turn_metrics``, ``error``, ``call_ended``...).
HEARD_AUDIO = "audio"
HEARD_MARK = Out.MARK.value
HEARD_CLEAR = Out.CLEAR.value
# The per-frame path formats audio frames by hand (protocol.audio_frame; see the module's
# docstring) and compares plain strings.
_AGENT_AUDIO, _READY = Out.AGENT_AUDIO.value, Out.READY.value


@dataclass(slots=True)
class Heard:
    """One message from callmesh, normalized: ``kind`` is :data:`HEARD_AUDIO`,
    :data:`HEARD_MARK`, :data:`HEARD_CLEAR`, or the native type."""

    kind: str
    turn: int | None = None
    payload: str = ""  # base64 agent audio
    name: str = ""  # mark name
    frame: dict[str, Any] | None = None


def _b64_len(payload: str) -> int:
    return len(payload) * 3 // 4 - payload[-2:].count("=")


def audio_bytes(heard: Heard) -> int:
    return _b64_len(heard.payload) if heard.payload else 0


class Wire(Protocol):
    def path(self) -> str: ...
    def opening(self) -> list[str]: ...
    def media(self, payload: str, ts_ms: int) -> str: ...
    def mark(self, name: str) -> str: ...
    def dtmf(self, digit: str) -> str: ...
    def stop(self) -> str: ...
    def decode(self, raw: str) -> Heard: ...


class TwilioWire:
    """Twilio's side of a bidirectional Media Stream."""

    def __init__(
        self, call_id: str, tenant: str, caller: str, parameters: dict[str, str] | None = None
    ) -> None:
        self.call_id = call_id
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.account_sid = "AC" + uuid.uuid4().hex
        if parameters is None:
            # What the voice webhook puts in the TwiML: the signed stream token (tenant and
            # caller too, which only a router with authentication disabled reads).
            parameters = {"tenant": tenant, "caller": caller}
            token = stream_token(call_id, tenant, caller)
            if token:
                parameters["token"] = token
        self.parameters = parameters
        self._n = 0
        self._chunk = 0
        self._sid = f'"streamSid":"{self.stream_sid}"'

    def path(self) -> str:
        return TWILIO_MEDIA_PATH

    def _next(self) -> str:
        self._n += 1
        return str(self._n)

    def opening(self) -> list[str]:
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_id,
            "tracks": ["inbound"],
            "customParameters": self.parameters,
            "mediaFormat": {
                "encoding": "audio/x-mulaw",
                "sampleRate": TELEPHONY_RATE,
                "channels": 1,
            },
        }
        return [
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": self._next(),
                    "start": start,
                    "streamSid": self.stream_sid,
                }
            ),
        ]

    def media(self, payload: str, ts_ms: int) -> str:
        self._chunk += 1
        return (
            f'{{"event":"media","sequenceNumber":"{self._next()}","media":{{"track":"inbound",'
            f'"chunk":"{self._chunk}","timestamp":"{ts_ms}","payload":"{payload}"}},{self._sid}}}'
        )

    def _event(self, event: str, body: dict[str, Any]) -> str:
        msg = {"event": event, "sequenceNumber": self._next(), **body}
        return json.dumps({**msg, "streamSid": self.stream_sid})

    def mark(self, name: str) -> str:
        return self._event("mark", {"mark": {"name": name}})

    def dtmf(self, digit: str) -> str:
        return self._event("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}})

    def stop(self) -> str:
        return self._event(
            "stop", {"stop": {"accountSid": self.account_sid, "callSid": self.call_id}}
        )

    def decode(self, raw: str) -> Heard:
        msg = json.loads(raw)
        event = msg.get("event")
        if event == "media":
            return Heard(HEARD_AUDIO, payload=msg["media"]["payload"])
        if event == "mark":
            return Heard(HEARD_MARK, name=msg["mark"]["name"])
        if event == "clear":
            return Heard(HEARD_CLEAR)
        return Heard(str(event), frame=msg)


class NativeWire:
    """The native protocol with ``audio`` frames (mu-law 8 kHz)."""

    def __init__(self, call_id: str, tenant: str, caller: str) -> None:
        self.call_id = call_id
        self.tenant = tenant
        self.caller = caller
        self.seq = 0
        # What a resuming ``start`` carries (callmesh_client.reconnect).
        self.resume_secret = ""
        self.delivered_turn: int | None = None

    def path(self) -> str:
        return f"/v1/calls/{self.call_id}"

    def _frame(self, kind: In, **fields: Any) -> str:
        self.seq += 1
        return encode({"type": kind.value, "seq": self.seq, **fields})

    def opening(self) -> list[str]:
        audio = {"encoding": AudioEncoding.MULAW.value, "sample_rate": TELEPHONY_RATE}
        fields: dict[str, Any] = {}
        token = call_token(self.tenant, self.call_id, self.caller)
        if token:
            fields["token"] = token  # with every start, the resuming ones too
        if self.delivered_turn is not None:
            fields["delivered_turn"] = self.delivered_turn
        if self.resume_secret:
            fields["resume"] = self.resume_secret
        return [
            self._frame(In.START, tenant=self.tenant, caller=self.caller, audio=audio, **fields)
        ]

    def media(self, payload: str, ts_ms: int) -> str:
        self.seq += 1
        return audio_frame(self.seq, payload, ts_ms)

    def mark(self, name: str) -> str:
        return self._frame(In.MARK, name=name)

    def dtmf(self, digit: str) -> str:
        return self._frame(In.DTMF, digit=digit)

    def stop(self) -> str:
        return self._frame(In.HANGUP)

    def decode(self, raw: str) -> Heard:
        frame = json.loads(raw)
        kind = str(frame.get("type"))
        turn = frame.get("turn")
        turn = turn if isinstance(turn, int) else None
        if kind == _AGENT_AUDIO:
            return Heard(HEARD_AUDIO, turn, payload=frame.get("data", ""))
        if kind == HEARD_MARK:
            return Heard(HEARD_MARK, turn, name=str(frame.get("name", "")))
        if kind == _READY:
            # Resuming a live call: continue after what the node applied.
            self.seq = max(self.seq, int(frame.get("last_seq", 0)))
            secret = frame.get("resume")
            if isinstance(secret, str):
                self.resume_secret = secret  # rotated on every (re)connect
        return Heard(kind, turn, frame=frame)
