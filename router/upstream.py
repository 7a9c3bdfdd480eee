"""Node → caller: the frames of a call's owner node, each passed to the caller once.

Acknowledgements release the caller's kept frames, a relinked owner's repeated reply is
de-duplicated (:mod:`router.failover_buffer`), the first ``ready`` reaches the caller
(with its resume secret) and a later one becomes an ``owner`` frame."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, Protocol

from callmesh import metric_names as names
from callmesh.mux import Channel
from callmesh.protocol import (
    AGENT_AUDIO_TYPE,
    REPLY_TYPES,
    Ctl,
    ErrorCode,
    Out,
    encode,
    read_agent_audio,
)
from callmesh.telemetry import Metrics
from router.failover_buffer import (
    CLEAR,
    HOLD,
    SEND,
    DecidedText,
    ReplyDedup,
    UnackedFrames,
    Verdict,
    clear_frame,
)
from router.node_frames import kind_of, parse

log = logging.getLogger("callmesh.router.proxy")


class SendClient(Protocol):
    """Sends one frame to the caller: its type, its text, its parsed form when known, and
    the data of an ``agent_audio`` frame routed unparsed, as read (so that the client link
    does not read the frame again)."""

    def __call__(
        self, kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None, /
    ) -> Awaitable[None]: ...


class Outcome(StrEnum):
    ENDED = "ended"  # the call ended (hangup → call_ended)
    HANDOFF = "handoff"  # the node drains: move the call
    LOST = "lost"  # the link dropped: suspect the node
    DEAD = "dead"  # membership declared the node dead
    CLIENT_GONE = "client_gone"


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


class NodeFrames:
    """Reads one call's owner links, one after another, and answers the caller."""

    def __init__(
        self,
        unacked: UnackedFrames,
        replies: ReplyDedup,
        decided: DecidedText,
        metrics: Metrics,
        send_client: SendClient,
        call_ended: Callable[[], Awaitable[None]],
    ) -> None:
        self._unacked = unacked
        self._replies = replies
        self._decided = decided
        self._metrics = metrics
        self._send_client = send_client
        self._call_ended = call_ended
        # The caller heard its first ``ready``; every later one announces a new owner.
        self.ready_sent = False

    def release(self) -> None:
        """Drop the callbacks into the session once its call is over. They are bound
        methods of the session that owns this reader: a reference cycle that would keep
        an ended call's connection (its request, protocol and buffers) until a cyclic
        garbage collection, which the router runs rarely."""
        self._send_client = _closed_client
        self._call_ended = _nothing

    async def pump(
        self,
        channel: Channel,
        *,
        node_id: str | None,
        resume_secret: str | None,
        relink_reason: str,
        client_gone: Callable[[], bool],
    ) -> Outcome:
        """Node → client until the link ends; returns why it ended."""
        send_client = self._send_client
        while (raw := await channel.receive()) is not None:
            frame: dict[str, Any] | None = None
            kind = kind_of(raw)
            if kind is None:
                frame = parse(raw)
                if frame is None:
                    log.error("node sent invalid JSON", extra={"fields": {"node": node_id}})
                    continue
                kind = str(frame.get("type"))
            if kind == AGENT_AUDIO_TYPE and (audio := read_agent_audio(raw)) is not None:
                # Most of what a node says: routed by its numbers, never parsed (protocol).
                turn, n, data = audio
                verdict = self._replies.offer_audio(raw, turn, n, data)
                await self._deliver_reply(verdict, turn, kind, raw, None, data)
            elif kind in REPLY_TYPES:
                frame = frame or parse(raw)
                if frame is not None:
                    await self._forward_reply(kind, frame, raw)
            elif kind == Ctl.ACK:
                frame = frame or parse(raw) or {}
                seq = int(frame.get("seq", 0))
                self._unacked.ack(seq)
                self._decided.ack(seq, int(frame.get("turn", 0)))
            elif kind == Ctl.DECIDED:
                frame = frame or parse(raw) or {}
                if not self._decided.offer(frame, self._replies.completed_turn):
                    self._metrics.inc(names.REFUSED, bound="decided_text")
            elif kind == Ctl.HANDOFF:
                return Outcome.HANDOFF
            elif kind == Out.READY:
                if not self.ready_sent:
                    self.ready_sent = True
                    if resume_secret is not None:
                        frame = {**(frame or parse(raw) or {}), "resume": resume_secret}
                        raw = encode(frame)
                    await send_client(kind, raw, frame)
                else:  # a relink: the client learns its call's new owner (docs/protocol.md)
                    owner = owner_frame(frame or parse(raw) or {}, relink_reason)
                    await send_client(Out.OWNER.value, encode(owner), owner)
            elif kind == Out.TURN_METRICS:
                frame = frame or parse(raw) or {}
                turn = int(frame.get("turn", 0))
                self._decided.complete(turn)
                if self._replies.complete(turn):
                    await send_client(kind, raw, frame)
            elif kind == Out.CALL_ENDED:
                await self._call_ended()
                await send_client(kind, raw, frame)
                return Outcome.ENDED
            else:
                if kind == Out.ERROR:
                    frame = frame or parse(raw) or {}
                    if frame.get("code") == ErrorCode.CALL_ENDED:
                        await self._call_ended()
                        await send_client(kind, raw, frame)
                        return Outcome.ENDED
                await send_client(kind, raw, frame)
        if client_gone():
            return Outcome.CLIENT_GONE
        return Outcome.LOST

    async def _forward_reply(self, kind: str, frame: dict[str, Any], raw: str) -> None:
        verdict = self._replies.offer(kind, raw, frame)
        turn = int(frame.get("turn", 0)) if verdict is CLEAR else 0
        await self._deliver_reply(verdict, turn, kind, raw, frame)

    async def _deliver_reply(
        self,
        verdict: Verdict,
        turn: int,
        kind: str,
        raw: str,
        frame: dict[str, Any] | None,
        data: str | None = None,
    ) -> None:
        if verdict is SEND:
            await self._send_client(kind, raw, frame, data)
        elif verdict is HOLD:
            self._metrics.inc(names.REPLIES_DEDUPLICATED)
        elif verdict is CLEAR:
            # The new owner says something else: the caller drops the partial reply first,
            # then hears the new one from its start.
            clear_raw, clear = clear_frame(turn)
            await self._send_client(Out.CLEAR.value, clear_raw, clear)
            self._metrics.inc(names.REPLIES_CLEARED)
            for held in self._replies.take_held():
                await self._send_client(*held)
            await self._send_client(kind, raw, frame, data)


async def _closed_client(*_: object) -> None:
    """What a released reader sends to: nowhere, the call is over."""


async def _nothing() -> None:
    return None
