"""One client call through the router: placement, the node link, and failover.

The client's connection lives here for the whole call; the link to the owner node may be
replaced underneath it, invisibly to the caller (invariant 5): the caller's frames are
kept until the node acknowledges them and replayed to a new owner, and a turn the new
owner says again is de-duplicated (:mod:`router.failover_buffer`). The client side is a
:class:`~router.links.ClientLink` (native protocol or Twilio Media Streams), so all of it
works the same for every kind of client. Where the call runs is
:class:`~router.proxy_ports.CallPlacement`'s; the node's frames are read by
:class:`~router.upstream.NodeFrames`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from callmesh import metric_names as names
from callmesh import tracing
from callmesh.mux import Channel
from callmesh.protocol import CloseCode, ErrorCode, In, Inbound, encode
from callmesh.telemetry import Metrics
from router.failover_buffer import DecidedText, ReplyDedup, UnackedFrames
from router.limits import FrameRate, Rate, RelinkCap
from router.links import ClientLink
from router.node_links import NodeLinkError
from router.proxy_ports import CallLimits, CallPlacement, NodeLinkOpener
from router.ring import NoNodeAvailable
from router.upstream import NodeFrames, Outcome
from state_store.errors import StateStoreError

log = logging.getLogger("callmesh.router.proxy")

# When a node dies, every call on it relinks at once, and the new owners take them all
# together. A call with nothing of the caller's unanswered waits a random pause of up to
# this long first (or until the caller sends a frame), so that the calls with a turn in
# flight reach the new owners first instead of queueing behind idle ones (s).
IDLE_RELINK_SPREAD_S = 0.5
# More unacknowledged caller audio than this means an utterance is being heard or
# answered (a node acknowledges quiet audio once it is 1 s old, every 0.5 s).
UTTERANCE_AUDIO_MS = 2000


class ProxySession:
    """One caller's call, from its ``start`` until it ends, across any number of owners."""

    def __init__(
        self,
        link: ClientLink,
        placement: CallPlacement,
        node_links: NodeLinkOpener,
        metrics: Metrics,
        limits: CallLimits,
    ) -> None:
        self.link = link
        self._placement = placement
        self._node_links = node_links
        self._metrics = metrics
        self._limits = limits
        # The native path names the call; a Twilio call is named by its ``start``.
        self.call_id = link.call_id
        self.tenant = ""
        self.start: Inbound | None = None
        self.node_id: str | None = None
        # This call's channel on the owner node's link.
        self.upstream: Channel | None = None
        # Unacknowledged frames, kept for replay (the audio bound is set by ``start``).
        self.unacked = UnackedFrames(
            limits.max_unacked_frames, max_frame_bytes=limits.max_unacked_bytes
        )
        self.rate = FrameRate(limits.max_frames_per_s, limits.frame_burst)
        self._relink_cap = RelinkCap(limits.max_relinks, limits.relink_window_s)
        self.last_client_seq = 0
        self.replies = ReplyDedup()
        # The owner's decided reply of the turn in flight, for a new owner to say.
        self.decided = DecidedText()
        self.relink_reason = ""
        # Handed to the client in ``ready`` (router.call_auth): proof for a reconnect.
        self.resume_secret: str | None = None
        # Run once the call has ended, before the client hears so (router.app releases
        # the call's resume record: a client told "ended" finds it gone).
        self.on_ended: Callable[[], Awaitable[None]] | None = None
        self._ended = False
        # Flags, not asyncio.Events: an Event holds a deque of 760 bytes from the start,
        # and only an idle relink ever waits (for ``_client_sent``, made while it waits).
        self._client_gone = False
        # Set when the caller sends a frame other than audio (wakes an idle relink).
        self._client_sent: asyncio.Event | None = None
        # Set when membership declares the owner node dead; the pump (reading the node's
        # frames) is then cancelled at once (no second task waits for the death).
        self._node_dead = False
        self._pump: asyncio.Task[Outcome] | None = None
        self.failovers = 0
        self._node_frames = NodeFrames(
            self.unacked, self.replies, self.decided, metrics, self.send_client, self._call_ended
        )

    def __repr__(self) -> str:
        return (
            f"<ProxySession {self.link.kind} {self.tenant}/{self.call_id} node={self.node_id} "
            f"unacked={len(self.unacked)} "
            f"turn={self.replies.completed_turn} failovers={self.failovers}>"
        )

    @property
    def ended(self) -> bool:
        """The call ended (hangup → call_ended, or the node said it had ended)."""
        return self._ended

    # ------------------------------------------------------------------ client side

    async def send_client(
        self, kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None
    ) -> None:
        if not self.link.closed:
            try:
                await self.link.send(kind, raw, frame, data)
            except (ConnectionError, RuntimeError):
                self._client_gone = True

    async def wait_start(self) -> bool:
        """Read client frames until a valid ``start``; errors for anything before it."""
        while (inbound := await self.link.receive()) is not None:
            if inbound.type is not In.START:
                await self.link.refuse(
                    ErrorCode.NOT_STARTED, "send 'start' before anything else", inbound.seq
                )
                continue
            self.admit(inbound, inbound.body["tenant"])
            self.last_client_seq = inbound.seq
            self.unacked.bound_audio(self._limits.max_unacked_audio_ms, inbound.body.get("audio"))
            return True
        return False

    def admit(self, start: Inbound, tenant: str, resume_secret: str | None = None) -> None:
        """The call's ``start`` as the node must see it, once its credentials passed."""
        self.start = start
        self.call_id = self.link.call_id
        self.tenant = tenant
        self.resume_secret = resume_secret

    async def read_client(self) -> None:
        """Client → node: validate, keep until acknowledged, forward if a link is up."""
        link, unacked, metrics, rate = self.link, self.unacked, self._metrics, self.rate
        try:
            while (inbound := await link.receive()) is not None:
                seq = inbound.seq
                verdict = rate.admit(time.monotonic())
                if verdict is not Rate.ADMIT:
                    if await self._over_rate(verdict, seq):
                        return
                    continue
                if seq <= self.last_client_seq:
                    why = f"seq must increase (last was {self.last_client_seq})"
                    await link.refuse(ErrorCode.BAD_SEQ, why, seq)
                    continue
                if inbound.type is In.AUDIO:
                    if dropped := unacked.keep_audio(inbound):
                        metrics.inc(names.UNACKED_AUDIO_FRAMES_DROPPED, dropped)
                elif inbound.type is In.START:
                    await link.refuse(ErrorCode.ALREADY_STARTED, "call already started", seq)
                    continue
                elif not unacked.keep(inbound):
                    await link.refuse(
                        ErrorCode.UNAVAILABLE, "too many unacknowledged frames; slow down", seq
                    )
                    continue
                elif self._client_sent is not None:
                    self._client_sent.set()
                self.last_client_seq = seq
                up = self.upstream
                if up is not None and not up.closed:
                    try:
                        await up.send_str(inbound.raw)
                    except (ConnectionError, RuntimeError):
                        pass  # the link is failing; the frame is replayed to the next owner
        finally:
            self._client_gone = True
            up = self.upstream
            if up is not None and not self._ended:
                await up.close()

    async def _over_rate(self, verdict: Rate, seq: int) -> bool:
        """A frame over the rate is dropped; the client hears of it once a second, and is
        closed (True) when it keeps sending at twice the rate."""
        self._metrics.inc(names.REFUSED, bound="frame_rate")
        if verdict is Rate.CLOSE:
            log.info("frame rate sustained over its bound", extra={"fields": self._who()})
            await self.link.refuse(ErrorCode.RATE_LIMITED, "frame rate over its bound; closing")
            await self.link.close(CloseCode.OVER_LIMIT, b"frame_rate")
            return True
        if not self.rate.told:
            self.rate.told = True
            await self.link.refuse(ErrorCode.RATE_LIMITED, "too many frames a second", seq)
        return False

    def _who(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "call_id": self.call_id, "node": self.node_id}

    # ------------------------------------------------------------------ node side

    async def attach(self, node_id: str, reason: str) -> bool:
        """Open a link to ``node_id`` and replay the start and unacknowledged frames."""
        if self.start is None:
            raise RuntimeError("attach before start")
        url = self._placement.url(node_id)
        if url is None:
            return False
        # A new owner learns what the caller already has: a turn it restores as committed
        # but whose reply the caller never fully received is spoken again (de-duplicated).
        # (A new client connection is not a relink: nothing is known of what it heard.)
        # It also gets the reply the previous owner's model had finished writing for the
        # turn in flight, to say instead of asking its own model again.
        start = self.start.raw if reason == "start" else self._resume_start(self.start, reason)
        try:
            channel = await self._node_links.open(node_id, url, self.call_id, start)
        except NodeLinkError as exc:
            log.info("node link failed", extra={"fields": {"node": node_id, "error": str(exc)}})
            return False
        self.node_id = node_id
        self.relink_reason = reason
        self._node_dead = False
        self.upstream = channel
        self.replies.relink()
        try:
            # Frames the client reader appends while we replay are forwarded by it
            # directly, because ``self.upstream`` is already set.
            for frame in self.unacked.replay():
                await channel.send_str(frame.raw)
        except (ConnectionError, RuntimeError):
            return False
        return True

    def _resume_start(self, start: Inbound, reason: str) -> str:
        body = {**start.body, "resume": reason}
        body["delivered_turn"] = self.replies.completed_turn
        if self.decided.kept is not None:
            body["decided"] = self.decided.kept
        return encode(body)

    def _is_client_gone(self) -> bool:
        return self._client_gone

    async def pump_upstream(self) -> Outcome:
        """Node → client until the link ends; returns why it ended."""
        channel = self.upstream
        if channel is None:
            return Outcome.LOST
        return await self._node_frames.pump(
            channel,
            node_id=self.node_id,
            resume_secret=self.resume_secret,
            relink_reason=self.relink_reason,
            client_gone=self._is_client_gone,
        )

    async def _call_ended(self) -> None:
        self._ended = True
        if self.on_ended is not None:
            hook, self.on_ended = self.on_ended, None
            try:
                await hook()
            except StateStoreError as exc:
                log.warning("end of call not recorded", extra={"fields": {"error": str(exc)}})

    def node_died(self) -> None:
        """Membership declared our node dead (e.g. it is paused): abandon the link now."""
        self._node_dead = True
        if self._pump is not None:
            self._pump.cancel()

    async def _pump_or_death(self) -> Outcome:
        """Pump the link, unless the node is declared dead first: then stop reading at once
        (a paused node would hold a graceful close for seconds)."""
        pump = self._pump = asyncio.create_task(self.pump_upstream(), name=f"pump:{self.call_id}")
        try:
            # wait(), not await: the pump's cancellation by node_died is not ours.
            await asyncio.wait({pump})
        finally:
            self._pump = None
            if not pump.done():
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
        if pump.cancelled() or pump.exception() is not None:
            outcome = Outcome.DEAD
        else:
            outcome = pump.result()
            # The death dropped the node's link too: that is not a link to health-check.
            if outcome is Outcome.LOST and self._node_dead:
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
                await self._placement.forget(self.tenant, self.call_id, self.node_id)
            self._node_frames.release()

    async def _drive(self) -> None:
        reason = "start"
        node: str | None
        try:
            node = await self._placement.place(self.tenant, self.call_id, prefer_pin=True)
        except NoNodeAvailable:
            node = None
        deadline = time.monotonic() + self._limits.connect_timeout_s
        gap_started: float | None = None
        while True:
            if node is not None and await self.attach(node, reason):
                if gap_started is not None:
                    gap_ms = (time.monotonic() - gap_started) * 1000
                    self._metrics.inc(names.FAILOVERS)
                    self._metrics.observe(names.FAILOVER_GAP_MS, gap_ms)
                    gap_started = None
                deadline = time.monotonic() + self._limits.connect_timeout_s
                self._placement.track(self, node)
                try:
                    outcome = await self._pump_or_death()
                finally:  # also when the handler is cancelled: placement must not keep it
                    self._placement.untrack(self, node)
                if outcome in (Outcome.ENDED, Outcome.CLIENT_GONE) or self._client_gone:
                    return
                gap_started = time.monotonic()
                self.failovers += 1
                self._metrics.inc(names.RELINKS, outcome=outcome.value)
                if self._relink_cap.exceeded(time.monotonic()):
                    self._metrics.inc(names.REFUSED, bound="relinks")
                    log.warning("call relinked too often; ending it", extra={"fields": self._who()})
                    await self.link.refuse(
                        ErrorCode.RELINK_LIMIT, "the call lost its node link too often; call again"
                    )
                    await self.link.close(CloseCode.UNAVAILABLE, b"relink_limit")
                    return
                log.info(
                    "call relinking",
                    extra={
                        "fields": {"call_id": self.call_id, "node": node, "outcome": outcome.value}
                    },
                )
                attrs = {tracing.CALL_ID: self.call_id, tracing.NODE: node}
                with tracing.span(tracing.RELINK, attrs) as span:
                    reason, node = await self._after(outcome, node)
                    span.set_attributes(
                        {
                            "callmesh.relink.outcome": outcome.value,
                            tracing.RESUME_REASON: reason,
                            "callmesh.relink.to": node or "",
                        }
                    )
                continue
            if node is not None:
                self._placement.suspect(node)
            if time.monotonic() > deadline:
                await self.link.refuse(ErrorCode.UNAVAILABLE, "no conversation node available")
                await self.link.close(CloseCode.UNAVAILABLE)
                return
            await asyncio.sleep(0.05)
            try:
                node = await self._placement.place(self.tenant, self.call_id, prefer_pin=False)
            except NoNodeAvailable:
                node = None
            reason = "failover" if self._node_frames.ready_sent else "start"

    async def _after(self, outcome: Outcome, node: str) -> tuple[str, str | None]:
        """Where the call goes after its link ended: the same node if it is confirmed
        alive (the link broke, not the node), otherwise a new owner."""
        if outcome is Outcome.LOST and await self._placement.confirm_alive(node):
            return "reconnect", node
        if outcome is not Outcome.HANDOFF:
            self._placement.suspect(node)
        try:
            new = await self._placement.place(
                self.tenant, self.call_id, prefer_pin=False, exclude=node
            )
        except NoNodeAvailable:
            return "failover", None
        if outcome is Outcome.HANDOFF:
            return "handoff", new
        if not self._in_flight():
            await self._idle_pause(random.uniform(0, IDLE_RELINK_SPREAD_S))
        return "failover", new

    def _in_flight(self) -> bool:
        """Something of the caller's is unanswered: a frame, or an utterance's audio."""
        unacked = self.unacked
        return unacked.frames_waiting > 0 or unacked.audio_waiting_ms > UTTERANCE_AUDIO_MS

    async def _idle_pause(self, seconds: float) -> None:
        """Wait ``seconds``, or until the caller sends a frame."""
        if self._in_flight():
            return
        sent = self._client_sent = asyncio.Event()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await sent.wait()
        finally:
            self._client_sent = None
