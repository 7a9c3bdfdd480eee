"""One client call through the router: placement, the node link, and failover.

The client's connection lives here for the whole call; the link to the owner node may be
replaced underneath it. What makes a replacement invisible to the caller (invariant 5):

- inbound frames are kept until the node acknowledges them (``ack`` after its checkpoint)
  and replayed, in order, to a new owner, which skips what its checkpoint already applied;
- reply frames of a turn not yet acknowledged are remembered by ``(turn, n)``: a re-answer
  that says the same thing is not sent twice; one that says something else is preceded by
  ``clear`` so the caller drops the dead node's partial reply first.

The client side is a :class:`~router.links.ClientLink` (native protocol or Twilio Media
Streams), so all of the above works the same for every kind of client. Caller audio is
kept apart from the other frames: it is never refused, and only the oldest of it is
dropped when more than ``max_unacked_audio_ms`` waits for an acknowledgement.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections import deque
from enum import StrEnum
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from callmesh.mux import Channel
from callmesh.protocol import (
    REPLY_TYPES,
    AudioEncoding,
    CloseCode,
    Ctl,
    ErrorCode,
    In,
    Inbound,
    Out,
    encode,
)
from router.links import ClientLink
from router.node_links import NodeLinkError
from router.ring import NoNodeAvailable
from state_store.errors import StateStoreError

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger("callmesh.router.proxy")


class Outcome(StrEnum):
    ENDED = "ended"  # the call ended (hangup → call_ended)
    HANDOFF = "handoff"  # the node drains: move the call
    LOST = "lost"  # the link dropped: suspect the node
    DEAD = "dead"  # membership declared the node dead
    CLIENT_GONE = "client_gone"


_SEQ = attrgetter("seq")
_TYPE_PREFIX = '{"type":"'


def _kind_of(raw: str) -> str | None:
    """The type of a node frame without parsing it: nodes encode ``type`` first."""
    if raw.startswith(_TYPE_PREFIX):
        end = raw.find('"', 9)
        if end > 9:
            return raw[9:end]
    return None


def _parse(raw: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


def owner_frame(ready: dict[str, Any], reason: str) -> dict[str, Any]:
    """The ``owner`` frame for a new owner's ``ready`` (``reason``: failover, handoff or
    reconnect)."""
    return {
        "type": Out.OWNER.value,
        "turn": ready.get("turn", 0),
        "node": ready.get("node", ""),
        "epoch": ready.get("epoch", 0),
        "reason": reason,
    }


def _audio_bytes_per_ms(start: dict[str, Any]) -> int:
    audio = start.get("audio") or {}
    rate = int(audio.get("sample_rate", 8000))
    width = 2 if audio.get("encoding") == AudioEncoding.PCM16 else 1
    return max(1, width * rate // 1000)


class ProxySession:
    def __init__(self, router: Router, link: ClientLink) -> None:
        self._r = router
        self.link = link
        # The native path names the call; a Twilio call is named by its ``start``.
        self.call_id = link.call_id
        self.tenant = ""
        self.start: Inbound | None = None
        self.node_id: str | None = None
        # This call's channel on the owner node's link.
        self.upstream: Channel | None = None
        # Unacknowledged frames, kept for replay: audio apart (it is bounded by duration,
        # oldest dropped first), everything else by count (refused beyond it).
        self.unacked: deque[Inbound] = deque()
        self.unacked_audio: deque[Inbound] = deque()
        self._audio_sizes: deque[int] = deque()  # bytes of each unacked_audio frame
        self.unacked_audio_bytes = 0
        self._max_audio_bytes = 0
        self._audio_bytes_per_ms = 8
        self.last_client_seq = 0
        # Highest turn whose ``turn_metrics`` the client received: that reply is complete.
        # -1: not even turn 0 (the greeting) is complete yet.
        self.completed_turn = -1
        self.delivered: dict[tuple[int, int], int] = {}
        # duplicate frames of the in-flight turn, held back: (kind, raw, parsed)
        self._held: list[tuple[str, str, dict[str, Any]]] = []
        self._ready_sent = False
        self.relink_reason = ""
        self._ended = False
        self._client_gone = asyncio.Event()
        self._node_dead = asyncio.Event()
        self.failovers = 0

    def __repr__(self) -> str:
        return (
            f"<ProxySession {self.link.kind} {self.tenant}/{self.call_id} node={self.node_id} "
            f"unacked={len(self.unacked) + len(self.unacked_audio)} "
            f"turn={self.completed_turn} failovers={self.failovers}>"
        )

    # ------------------------------------------------------------------ client side

    async def send_client(self, kind: str, raw: str, frame: dict[str, Any] | None = None) -> None:
        if not self.link.closed:
            try:
                await self.link.send(kind, raw, frame)
            except (ConnectionError, RuntimeError):
                self._client_gone.set()

    async def wait_start(self) -> bool:
        """Read client frames until a valid ``start``; errors for anything before it."""
        while (inbound := await self.link.receive()) is not None:
            if inbound.type is not In.START:
                await self.link.refuse(
                    ErrorCode.NOT_STARTED, "send 'start' before anything else", inbound.seq
                )
                continue
            self.start = inbound
            self.call_id = self.link.call_id
            self.tenant = inbound.body["tenant"]
            self.last_client_seq = inbound.seq
            self._audio_bytes_per_ms = _audio_bytes_per_ms(inbound.body)
            self._max_audio_bytes = self._r.config.max_unacked_audio_ms * self._audio_bytes_per_ms
            return True
        return False

    async def read_client(self) -> None:
        """Client → node: validate, keep until acknowledged, forward if a link is up."""
        link = self.link
        max_frames = self._r.config.max_unacked_frames
        try:
            while (inbound := await link.receive()) is not None:
                seq = inbound.seq
                if seq <= self.last_client_seq:
                    why = f"seq must increase (last was {self.last_client_seq})"
                    await link.refuse(ErrorCode.BAD_SEQ, why, seq)
                    continue
                if inbound.type is In.AUDIO:
                    self._keep_audio(inbound)
                elif inbound.type is In.START:
                    await link.refuse(ErrorCode.ALREADY_STARTED, "call already started", seq)
                    continue
                elif len(self.unacked) >= max_frames:
                    await link.refuse(
                        ErrorCode.UNAVAILABLE, "too many unacknowledged frames; slow down", seq
                    )
                    continue
                else:
                    self.unacked.append(inbound)
                self.last_client_seq = seq
                up = self.upstream
                if up is not None and not up.closed:
                    try:
                        await up.send_str(inbound.raw)
                    except (ConnectionError, RuntimeError):
                        pass  # the link is failing; the frame is replayed to the next owner
        finally:
            self._client_gone.set()
            up = self.upstream
            if up is not None and not self._ended:
                await up.close()

    def _keep_audio(self, frame: Inbound) -> None:
        """Keep caller audio for replay; live audio is never refused, so past the bound the
        oldest unacknowledged audio goes (a new owner hears the most recent of it)."""
        size = _data_bytes(frame)
        self.unacked_audio.append(frame)
        self._audio_sizes.append(size)
        self.unacked_audio_bytes += size
        if self.unacked_audio_bytes <= self._max_audio_bytes:
            return
        dropped = 0
        while self.unacked_audio_bytes > self._max_audio_bytes and len(self.unacked_audio) > 1:
            self.unacked_audio.popleft()
            self.unacked_audio_bytes -= self._audio_sizes.popleft()
            dropped += 1
        self._r.metrics.inc("unacked_audio_frames_dropped", dropped)

    def unacked_frames(self) -> list[Inbound]:
        """Every unacknowledged frame in ``seq`` order (a copy: the reader may append)."""
        return list(heapq.merge(list(self.unacked), list(self.unacked_audio), key=_SEQ))

    # ------------------------------------------------------------------ node side

    async def attach(self, node_id: str, reason: str) -> bool:
        """Open a link to ``node_id`` and replay the start and unacknowledged frames."""
        if self.start is None:
            raise RuntimeError("attach before start")
        url = self._r.membership.url(node_id)
        if url is None:
            return False
        # A new owner learns what the caller already has: a turn it restores as committed
        # but whose reply the caller never fully received is spoken again (de-duplicated).
        # (A new client connection is not a relink: nothing is known of what it heard.)
        start = (
            self.start.raw
            if reason == "start"
            else encode(
                {**self.start.body, "resume": reason, "delivered_turn": self.completed_turn}
            )
        )
        try:
            channel = await self._r.node_links.open(node_id, url, self.call_id, start)
        except NodeLinkError as exc:
            log.info("node link failed", extra={"fields": {"node": node_id, "error": str(exc)}})
            return False
        self.node_id = node_id
        self.relink_reason = reason
        self._node_dead.clear()
        self.upstream = channel
        # Held frames are what the previous link re-said; the new one starts its reply over.
        self._held.clear()
        try:
            # Frames the client reader appends while we replay are forwarded by it
            # directly, because ``self.upstream`` is already set.
            for frame in self.unacked_frames():
                await channel.send_str(frame.raw)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def pump_upstream(self) -> Outcome:
        """Node → client until the link ends; returns why it ended."""
        channel = self.upstream
        if channel is None:
            return Outcome.LOST
        while (raw := await channel.receive()) is not None:
            frame: dict[str, Any] | None = None
            kind = _kind_of(raw)
            if kind is None:
                frame = _parse(raw)
                if frame is None:
                    log.error("node sent invalid JSON", extra={"fields": {"node": self.node_id}})
                    continue
                kind = str(frame.get("type"))
            if kind in REPLY_TYPES:
                frame = frame or _parse(raw)
                if frame is not None:
                    await self._forward_reply(kind, frame, raw)
            elif kind == Ctl.ACK:
                frame = frame or _parse(raw) or {}
                self._on_ack(int(frame.get("seq", 0)))
            elif kind == Ctl.HANDOFF:
                return Outcome.HANDOFF
            elif kind == Out.READY:
                if not self._ready_sent:
                    self._ready_sent = True
                    await self.send_client(kind, raw, frame)
                else:  # a relink: the client learns its call's new owner (docs/protocol.md)
                    owner = owner_frame(frame or _parse(raw) or {}, self.relink_reason)
                    await self.send_client(Out.OWNER.value, encode(owner), owner)
            elif kind == Out.TURN_METRICS:
                frame = frame or _parse(raw) or {}
                turn = int(frame.get("turn", 0))
                if turn > self.completed_turn:
                    self._complete(turn)
                    await self.send_client(kind, raw, frame)
            elif kind == Out.CALL_ENDED:
                self._ended = True
                await self.send_client(kind, raw, frame)
                return Outcome.ENDED
            else:
                if kind == Out.ERROR:
                    frame = frame or _parse(raw) or {}
                    if frame.get("code") == ErrorCode.CALL_ENDED:
                        self._ended = True
                        await self.send_client(kind, raw, frame)
                        return Outcome.ENDED
                await self.send_client(kind, raw, frame)
        if self._client_gone.is_set():
            return Outcome.CLIENT_GONE
        return Outcome.LOST

    def _on_ack(self, seq: int) -> None:
        while self.unacked and self.unacked[0].seq <= seq:
            self.unacked.popleft()
        audio, sizes = self.unacked_audio, self._audio_sizes
        while audio and audio[0].seq <= seq:
            audio.popleft()
            self.unacked_audio_bytes -= sizes.popleft()

    def _complete(self, turn: int) -> None:
        self.completed_turn = turn
        self.delivered = {k: v for k, v in self.delivered.items() if k[0] > turn}
        self._held.clear()

    async def _forward_reply(self, kind: str, frame: dict[str, Any], raw: str) -> None:
        turn, n = int(frame.get("turn", 0)), int(frame.get("n", 0))
        if turn <= self.completed_turn:
            return  # the caller has this turn's whole reply already
        digest = hash(frame.get("text") or frame.get("data") or frame.get("name") or "")
        key = (turn, n)
        seen = self.delivered.get(key)
        if seen is None:
            self.delivered[key] = digest
            await self.send_client(kind, raw, frame)
        elif seen == digest:
            self._held.append((kind, raw, frame))  # the caller has this already
            self._r.metrics.inc("replies_deduplicated")
        else:
            # The new owner says something else: the caller drops the partial reply first,
            # then hears the new one from its start.
            clear = {"type": Out.CLEAR.value, "turn": turn, "reason": "failover"}
            await self.send_client(Out.CLEAR.value, encode(clear), clear)
            self._r.metrics.inc("replies_cleared")
            self.delivered = {k: v for k, v in self.delivered.items() if k[0] != turn}
            held, self._held = self._held, []
            for h in held:
                await self.send_client(*h)
            self.delivered[key] = digest
            await self.send_client(kind, raw, frame)

    def node_died(self) -> None:
        """Membership declared our node dead (e.g. it is paused): abandon the link now."""
        self._node_dead.set()

    async def _pump_or_death(self) -> Outcome:
        """Pump the link, unless the node is declared dead first: then stop reading at once
        (a paused node would hold a graceful close for seconds)."""
        pump = asyncio.create_task(self.pump_upstream(), name=f"pump:{self.call_id}")
        dead = asyncio.create_task(self._node_dead.wait(), name=f"death:{self.call_id}")
        try:
            await asyncio.wait({pump, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, dead, return_exceptions=True)
        if pump.cancelled() or pump.exception() is not None:
            outcome = Outcome.DEAD
        else:
            outcome = pump.result()
            # The death dropped the node's link too: that is not a link to health-check.
            if outcome is Outcome.LOST and self._node_dead.is_set():
                outcome = Outcome.DEAD
        if outcome is Outcome.DEAD and self.upstream is not None:
            await self.upstream.close()
        return outcome

    # ------------------------------------------------------------------ the call

    async def run(self) -> None:
        """Drive a started call (``wait_start`` returned True) until it ends."""
        reader = asyncio.create_task(self.read_client(), name=f"client:{self.call_id}")
        try:
            await self._drive()
        except StateStoreError as exc:
            await self.link.refuse(ErrorCode.UNAVAILABLE, f"state store: {exc}")
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if self.upstream is not None and not self.upstream.closed:
                await asyncio.shield(self.upstream.close())
            if self._ended and self.node_id:
                await self._r.forget_pin(self.tenant, self.call_id, self.node_id)

    async def _drive(self) -> None:
        reason = "start"
        node: str | None
        try:
            node = await self._r.place(self.tenant, self.call_id, prefer_pin=True)
        except NoNodeAvailable:
            node = None
        deadline = time.monotonic() + self._r.config.connect_timeout_ms / 1000
        gap_started: float | None = None
        while True:
            if node is not None and await self.attach(node, reason):
                if gap_started is not None:
                    self._r.observe_failover(time.monotonic() - gap_started)
                    gap_started = None
                deadline = time.monotonic() + self._r.config.connect_timeout_ms / 1000
                self._r.track(self, node)
                outcome = await self._pump_or_death()
                self._r.untrack(self, node)
                if outcome in (Outcome.ENDED, Outcome.CLIENT_GONE) or self._client_gone.is_set():
                    return
                gap_started = time.monotonic()
                self.failovers += 1
                self._r.metrics.inc(f"relinks_{outcome.value}")
                log.info(
                    "call relinking",
                    extra={
                        "fields": {"call_id": self.call_id, "node": node, "outcome": outcome.value}
                    },
                )
                reason, node = await self._after(outcome, node)
                continue
            if node is not None:
                self._r.membership.suspect(node)
            if time.monotonic() > deadline:
                await self.link.refuse(ErrorCode.UNAVAILABLE, "no conversation node available")
                await self.link.close(CloseCode.UNAVAILABLE)
                return
            await asyncio.sleep(0.05)
            try:
                node = await self._r.place(self.tenant, self.call_id, prefer_pin=False)
            except NoNodeAvailable:
                node = None
            reason = "failover" if self._ready_sent else "start"

    async def _after(self, outcome: Outcome, node: str) -> tuple[str, str | None]:
        """Where the call goes after its link ended: the same node if it is confirmed
        alive (the link broke, not the node), otherwise a new owner."""
        if outcome is Outcome.LOST and await self._r.confirm_alive(node):
            return "reconnect", node
        if outcome is not Outcome.HANDOFF:
            self._r.membership.suspect(node)
        try:
            new = await self._r.place(self.tenant, self.call_id, prefer_pin=False, exclude=node)
        except NoNodeAvailable:
            return "failover", None
        return ("handoff" if outcome is Outcome.HANDOFF else "failover"), new


def _data_bytes(frame: Inbound) -> int:
    """Bytes of audio in an ``audio`` frame, from its base64 length (never decoded)."""
    data: str = frame.body["data"]
    n = len(data) * 3 >> 2
    if data.endswith("="):
        n -= 2 if data.endswith("==") else 1
    return n
