"""A native-protocol call client, used by ``callmesh call``, the tests and the load tests.

It numbers inbound frames (``seq``), assembles each turn's reply from ``agent_text``
frames, honours ``clear`` (drops what it had of that turn) and keeps the evidence the
chaos benchmark scores: duplicate reply frames and the time every frame arrived.

When its router goes away (killed: the connection drops; draining: a ``reconnect`` frame
and close 4012) it reconnects to the next router of its list (:mod:`.reconnect`) and
resumes: ``start`` again, with the call's resume secret (``ready.resume``) when it has one
and ``delivered_turn`` (the last turn whose reply it received whole, so the node says a
committed but undelivered reply again); the new ``ready.last_seq`` tells which of its frames
the node never applied, and those are sent again with new numbers after it. Reply frames
of an unfinished turn that arrive again after a resume are dropped if identical, or
replace the turn if the node said something else: a resumed caller hears each reply once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from callmesh.protocol import In, Out, read_agent_audio
from callmesh_client.credentials import call_token
from callmesh_client.reconnect import ReconnectPolicy, RouterList, should_reconnect

# Frames kept for a resend after a reconnect (the text client sends a few per turn).
MAX_UNAPPLIED_FRAMES = 256
DEFAULT_RECONNECT = ReconnectPolicy()


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
    development secret, if there is one; see :mod:`callmesh_client.credentials`). The
    same token goes with every resuming ``start``."""

    def __init__(
        self,
        router_url: str | Sequence[str],
        call_id: str,
        *,
        timeout_s: float = 30.0,
        reconnect: ReconnectPolicy | None = DEFAULT_RECONNECT,
        token: str | None = None,
        auth_secret: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        urls = [router_url] if isinstance(router_url, str) else list(router_url)
        self.routers = RouterList([u.rstrip("/") for u in urls])
        self.call_id = call_id
        self.timeout_s = timeout_s
        self.reconnect_policy = reconnect
        self.token = token
        self._auth_secret = auth_secret
        self.seq = 0
        self.ready: dict[str, Any] | None = None
        self.duplicates = 0
        self.errors: list[dict[str, Any]] = []
        self.ended = False
        self.reconnects = 0  # successful resumes through a new connection
        self.replayed_frames = 0  # reply frames received again after a resume, dropped
        # The close code and reason the router ended the connection with, once it did.
        self.close_code: int | None = None
        self.close_reason = ""
        self._session: aiohttp.ClientSession | None = None
        # A session given by the caller (a load generator holding thousands of calls
        # shares one) is the caller's to close; otherwise the call opens its own.
        self._shared_session = session
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
        # What a resume needs: the start's fields, the secret, frames not known applied.
        self._start_fields: dict[str, Any] | None = None
        self._resume_secret: str | None = None
        self._unapplied: list[dict[str, Any]] = []
        self._resuming = False
        self._resume_ready = False
        self._resumed_turns: set[int] = set()

    @property
    def router_url(self) -> str:
        return self.routers.url

    async def __aenter__(self) -> CallClient:
        self._session = self._shared_session or aiohttp.ClientSession()
        try:
            self._ws = await self._connect(self.routers.url)
        except BaseException:
            if self._shared_session is None:
                await self._session.close()
            self._session = None
            raise
        self._reader = asyncio.create_task(self._run(), name=f"call-client:{self.call_id}")
        return self

    async def _connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        if self._session is None:
            raise RuntimeError("not open")
        ws_url = url.replace("http://", "ws://").replace("https://", "wss://")
        return await self._session.ws_connect(f"{ws_url}/v1/calls/{self.call_id}")

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
            if self._shared_session is None:
                await asyncio.shield(self._session.close())
            self._session = None

    async def send(self, msg: dict[str, Any]) -> int:
        """Number and send one frame; while reconnecting it waits for the resume."""
        if self._session is None:
            raise RuntimeError("not connected")
        self.seq += 1
        frame = {**msg, "seq": self.seq}
        if msg.get("type") != In.START.value:
            self._unapplied.append(frame)
            del self._unapplied[:-MAX_UNAPPLIED_FRAMES]
        ws = self._ws
        if ws is not None and not ws.closed and not self._resuming:
            # A frame lost with a dying connection is sent again after the resume.
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(frame))
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
        fields: dict[str, Any] = {"type": In.START.value, "tenant": tenant, "caller": caller}
        token = self.token or call_token(tenant, self.call_id, caller, self._auth_secret)
        if token:
            fields["token"] = token
        # Kept for the resuming starts of reconnects (the token goes with each of them).
        self._start_fields = fields
        if resume:
            self._resume_secret = resume
            fields = {**fields, "resume": resume}
        await self.send(fields)
        await asyncio.wait_for(self._ready_evt.wait(), self.timeout_s)
        if self.ready is None:
            closed = {"code": "closed", "close_code": self.close_code, "message": self.close_reason}
            raise CallError(self.errors[-1] if self.errors else closed)
        return self.ready

    @property
    def resume_secret(self) -> str | None:
        """The secret that lets a new connection take this call over: the one of the
        latest ``ready`` (it is rotated on every successful (re)connect)."""
        return self._resume_secret

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

    async def _run(self) -> None:
        """Read frames; when the connection ends while the call goes on, reconnect and
        resume (bounded by the policy), then read on."""
        try:
            while True:
                await self._read()
                if not self._wants_reconnect():
                    return
                if not await self._reconnect():
                    self.errors.append(
                        {"type": "error", "code": "closed", "message": "could not reconnect"}
                    )
                    return
        finally:
            self._ready_evt.set()
            self._ended_evt.set()
            self._done.put_nowait(
                {"type": Out.ERROR.value, "code": "closed", "message": "connection closed"}
            )

    def _wants_reconnect(self) -> bool:
        return (
            self.reconnect_policy is not None
            and self.ready is not None
            and not self.ended
            and should_reconnect(self.close_code)
        )

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
                audio = read_agent_audio(msg.data)
                if audio is not None:  # most of a reply: taken apart without parsing
                    self._on_audio(audio[0], audio[2])
                else:
                    self._on_frame(json.loads(msg.data))
                if self._resume_ready:
                    await self._resend()
        except (aiohttp.ClientError, ConnectionError):
            pass  # a lost connection: the close code stays None and we reconnect
        self.close_code = ws.close_code

    async def _reconnect(self) -> bool:
        """Another connection, through the next router, and a resuming ``start``."""
        policy = self.reconnect_policy
        if policy is None or self._start_fields is None:
            return False
        deadline = time.monotonic() + policy.give_up_after_s
        self._resuming = True
        # Turns whose reply is unfinished: their frames may come again.
        self._resumed_turns = {t for t in self._turns if t > self._last_done_turn}
        attempt = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(policy.delay(attempt, self.routers.rng))
            attempt += 1
            url = self.routers.advance()
            try:
                ws = await asyncio.wait_for(self._connect(url), self.timeout_s)
            except (aiohttp.ClientError, OSError, TimeoutError):
                continue
            old, self._ws = self._ws, ws
            if old is not None:
                await asyncio.shield(old.close())
            start = {**self._start_fields, "delivered_turn": self._last_done_turn}
            if self._resume_secret:
                start["resume"] = self._resume_secret
            self.seq += 1
            try:
                await ws.send_str(json.dumps({**start, "seq": self.seq}))
            except (ConnectionError, RuntimeError):
                continue
            return True
        return False

    async def _resend(self) -> None:
        """After the resuming ``ready``: frames the node never applied, renumbered."""
        self._resume_ready = False
        last_seq = int((self.ready or {}).get("last_seq", 0))
        pending = [f for f in self._unapplied if f["seq"] > last_seq]
        self._unapplied = []
        self._resuming = False
        self.reconnects += 1
        for frame in pending:
            await self.send({k: v for k, v in frame.items() if k != "seq"})

    def _on_audio(self, turn: int, data: str, now: float | None = None) -> None:
        t = self._turns.setdefault(turn, _Turn())
        now = time.monotonic() if now is None else now
        t.first_audio_at = t.first_audio_at or now
        t.frame_times.append(now)
        t.audio_bytes += len(data) * 3 // 4

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        now = time.monotonic()
        if kind == Out.READY.value:
            self.ready = frame
            secret = frame.get("resume")
            if isinstance(secret, str) and secret:
                self._resume_secret = secret  # rotated on every (re)connect
            # Resuming a live call from a new connection: continue after what was applied.
            self.seq = max(self.seq, int(frame.get("last_seq", 0)))
            if self._resuming:
                self._resume_ready = True
            else:
                self._unapplied = [f for f in self._unapplied if f["seq"] > self.seq]
            self._ready_evt.set()
        elif kind == Out.RECONNECT.value:
            pass  # the close (4012) follows; the reader reconnects then
        elif kind == Out.AGENT_TEXT.value:
            turn = int(frame["turn"])
            t = self._turns.setdefault(turn, _Turn())
            n = int(frame["n"])
            text = str(frame["text"])
            if n in t.texts:
                if turn not in self._resumed_turns:
                    self.duplicates += 1
                elif t.texts[n] == text:
                    self.replayed_frames += 1  # said again after the resume: heard already
                    return
                else:
                    # The node answered the resumed turn differently: the new reply wins.
                    t = self._turns[turn] = _Turn(cleared=True)
            t.texts[n] = text
            t.first_text_at = t.first_text_at or now
            t.frame_times.append(now)
        elif kind == Out.AGENT_AUDIO.value:
            self._on_audio(int(frame["turn"]), str(frame.get("data", "")), now)
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
        if kind == Out.TURN_METRICS.value:
            # A completed turn: its frames (and all before) were applied by the node.
            self._resumed_turns.discard(int(frame["turn"]))
