"""A native-protocol call client, used by ``callmesh call``, the tests and the load tests.

It numbers inbound frames (``seq``), assembles each turn's reply from ``agent_text``
frames, honours ``clear`` (drops what it had of that turn) and keeps the evidence the
chaos benchmark scores: duplicate reply frames and the time every frame arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from callmesh.protocol import In, Out
from callmesh_client.credentials import call_token


class CallError(Exception):
    """The router or node answered a frame of ours with an ``error`` frame."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code = str(frame.get("code"))
        self.frame = frame


@dataclass
class Reply:
    turn: int
    text: str
    metrics: dict[str, Any]
    sent_at: float
    first_text_at: float | None
    first_audio_at: float | None
    done_at: float
    audio_bytes: int = 0
    cleared: bool = False
    # Arrival time (monotonic) of every reply frame of the turn, in order.
    frame_times: list[float] = field(default_factory=list)

    @property
    def latency_ms(self) -> float:
        """Client-observed: frame sent → first agent audio (or text) received."""
        first = self.first_audio_at or self.first_text_at or self.done_at
        return (first - self.sent_at) * 1000


@dataclass
class _Turn:
    texts: dict[int, str] = field(default_factory=dict)
    first_text_at: float | None = None
    first_audio_at: float | None = None
    audio_bytes: int = 0
    cleared: bool = False
    frame_times: list[float] = field(default_factory=list)


class CallClient:
    """``token``: the call token to present in ``start`` (None: minted from the
    development secret, if there is one; see :mod:`callmesh_client.credentials`)."""

    def __init__(
        self,
        router_url: str,
        call_id: str,
        *,
        timeout_s: float = 30.0,
        token: str | None = None,
        auth_secret: str | None = None,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.call_id = call_id
        self.timeout_s = timeout_s
        self.token = token
        self._auth_secret = auth_secret
        # The close code and reason the router ended the connection with, once it did.
        self.close_code: int | None = None
        self.close_reason = ""
        self.seq = 0
        self.ready: dict[str, Any] | None = None
        self.duplicates = 0
        self.errors: list[dict[str, Any]] = []
        self.ended = False
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._turns: dict[int, _Turn] = {}
        self._done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ready_evt = asyncio.Event()
        self._greeted = asyncio.Event()
        self._ended_evt = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._last_done_turn = 0
        # Turn 0 is the agent's greeting, spoken before the caller says anything.
        self.greeting = ""

    async def __aenter__(self) -> CallClient:
        ws_url = self.router_url.replace("http://", "ws://").replace("https://", "wss://")
        self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._session.ws_connect(f"{ws_url}/v1/calls/{self.call_id}")
        except BaseException:
            await self._session.close()
            raise
        self._reader = asyncio.create_task(self._read(), name=f"call-client:{self.call_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._ws is not None:
            await asyncio.shield(self._ws.close())
            self._ws = None
        if self._session is not None:
            await asyncio.shield(self._session.close())
            self._session = None

    async def send(self, msg: dict[str, Any]) -> int:
        if self._ws is None:
            raise RuntimeError("not connected")
        self.seq += 1
        await self._ws.send_str(json.dumps({**msg, "seq": self.seq}))
        return self.seq

    async def send_raw(self, data: str) -> None:
        if self._ws is None:
            raise RuntimeError("not connected")
        await self._ws.send_str(data)

    async def start(
        self, tenant: str, caller: str = "anonymous", *, resume: str | None = None
    ) -> dict[str, Any]:
        """Start the call, or resume it from a new connection with the ``resume`` secret
        of the last ``ready`` (``ready["resume"]``)."""
        msg: dict[str, Any] = {"type": In.START.value, "tenant": tenant, "caller": caller}
        token = self.token or call_token(tenant, self.call_id, caller, self._auth_secret)
        if token:
            msg["token"] = token
        if resume:
            msg["resume"] = resume
        await self.send(msg)
        await asyncio.wait_for(self._ready_evt.wait(), self.timeout_s)
        if self.ready is None:
            closed = {"code": "closed", "close_code": self.close_code, "message": self.close_reason}
            raise CallError(self.errors[-1] if self.errors else closed)
        return self.ready

    @property
    def resume_secret(self) -> str | None:
        """The secret that lets a new connection take this call over (from ``ready``)."""
        return None if self.ready is None else self.ready.get("resume")

    async def wait_greeting(self) -> str:
        """The turn-0 greeting (nodes that greet send it right after ``ready``)."""
        await asyncio.wait_for(self._greeted.wait(), self.timeout_s)
        return self.greeting

    async def say(self, text: str) -> Reply:
        """Send one finished utterance and wait for the whole reply of its turn."""
        sent_at = time.monotonic()
        seq = await self.send({"type": In.USER_TEXT.value, "text": text})
        while True:
            frame = await asyncio.wait_for(self._done.get(), self.timeout_s)
            if frame.get("type") == Out.ERROR.value:
                if frame.get("seq") == seq:
                    raise CallError(frame)
                continue
            turn = int(frame["turn"])
            t = self._turns.pop(turn, _Turn())
            return Reply(
                turn=turn,
                text=" ".join(t.texts[k] for k in sorted(t.texts)),
                metrics=frame,
                sent_at=sent_at,
                first_text_at=t.first_text_at,
                first_audio_at=t.first_audio_at,
                done_at=time.monotonic(),
                audio_bytes=t.audio_bytes,
                cleared=t.cleared,
                frame_times=t.frame_times,
            )

    async def hangup(self) -> None:
        await self.send({"type": In.HANGUP.value})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended_evt.wait(), self.timeout_s)

    async def _read(self) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    if msg.type is aiohttp.WSMsgType.CLOSE and isinstance(msg.extra, str):
                        self.close_reason = msg.extra
                    break
                self._on_frame(json.loads(msg.data))
        finally:
            self.close_code = ws.close_code
            self._ready_evt.set()
            self._ended_evt.set()
            self._done.put_nowait(
                {"type": Out.ERROR.value, "code": "closed", "message": "connection closed"}
            )

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        now = time.monotonic()
        if kind == Out.READY.value:
            self.ready = frame
            # Resuming a live call from a new connection: continue after what was applied.
            self.seq = max(self.seq, int(frame.get("last_seq", 0)))
            self._ready_evt.set()
        elif kind == Out.AGENT_TEXT.value:
            t = self._turns.setdefault(int(frame["turn"]), _Turn())
            n = int(frame["n"])
            if n in t.texts:
                self.duplicates += 1
            t.texts[n] = str(frame["text"])
            t.first_text_at = t.first_text_at or now
            t.frame_times.append(now)
        elif kind == Out.AGENT_AUDIO.value:
            t = self._turns.setdefault(int(frame["turn"]), _Turn())
            t.first_audio_at = t.first_audio_at or now
            t.frame_times.append(now)
            t.audio_bytes += len(frame.get("data", "")) * 3 // 4
        elif kind == Out.CLEAR.value:
            turn = int(frame["turn"])
            self._turns[turn] = _Turn(cleared=True)
        elif kind == Out.TURN_METRICS.value:
            turn = int(frame["turn"])
            if turn == 0:
                t = self._turns.pop(0, _Turn())
                self.greeting = " ".join(t.texts[k] for k in sorted(t.texts))
                self._greeted.set()
            elif turn > self._last_done_turn:
                self._last_done_turn = turn
                self._done.put_nowait(frame)
        elif kind == Out.ERROR.value:
            self.errors.append(frame)
            if self.ready is None:
                self._ready_evt.set()
            self._done.put_nowait(frame)
        elif kind == Out.CALL_ENDED.value:
            self.ended = True
            self._ended_evt.set()
