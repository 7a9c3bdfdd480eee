"""Reading a live call's frames off its link into its session, one bad frame or one failed
turn never ending the call."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from callmesh.mux import Channel
from callmesh.protocol import ErrorCode, ProtocolError, error_frame, parse_inbound
from conversation_node.call_links import CallLink
from conversation_node.session import CallDropped, CallSession, CallState
from state_store.errors import StateStoreError

log = logging.getLogger("callmesh.node")


async def pump(link: CallLink, session: CallSession, max_frame_bytes: int) -> None:
    """Feed the session every frame of the link until the call ends or the link does."""
    if isinstance(link, Channel):
        link.fast_path = _audio_now(link, session, max_frame_bytes)
    try:
        await _read_frames(link, session, max_frame_bytes)
    finally:
        if isinstance(link, Channel):
            link.fast_path = None


def _audio_now(channel: Channel, session: CallSession, max_bytes: int) -> Callable[[str], bool]:
    """The channel's fast path: most frames are audio the session can take at once,
    without a wake-up of this call's task per frame (50 a second per call)."""

    def audio_now(text: str) -> bool:
        try:
            inbound = parse_inbound(text, max_bytes)
        except ProtocolError:
            return False  # answered by _read_frames, which parses it again
        try:
            return session.handle_audio_now(inbound)
        except Exception:
            # As in _read_frames: a bug in one frame must not take the call (or, here,
            # every call on the link) down with it. The frame was taken.
            log.exception("turn failed", extra={"fields": {"call_id": session.call_id}})
            with contextlib.suppress(ConnectionError):
                channel.send_nowait(
                    error_frame(
                        ErrorCode.INTERNAL, "internal error in this turn", turn=session.turn
                    )
                )
            return True

    return audio_now


async def _read_frames(link: CallLink, session: CallSession, max_bytes: int) -> None:
    while (text := await link.receive()) is not None:
        try:
            inbound = parse_inbound(text, max_bytes)
        except ProtocolError as exc:
            await link.send_str(error_frame(exc.code, exc.message, seq=exc.seq, turn=session.turn))
            continue
        try:
            await session.handle(inbound)
        except CallDropped:
            raise
        except (StateStoreError, ConnectionError):
            raise
        except Exception:
            # A bug in one turn must not take the call (or the node) down with it.
            log.exception("turn failed", extra={"fields": {"call_id": session.call_id}})
            await link.send_str(
                error_frame(
                    ErrorCode.INTERNAL,
                    "internal error in this turn",
                    seq=inbound.seq,
                    turn=session.turn,
                )
            )
            continue
        if session.state in (CallState.ENDED, CallState.HANDED_OFF):
            return
