"""What a proxied call needs of the rest of the router: its bounds, where it runs, and
channels to nodes (the collaborators :class:`router.proxy.ProxySession` is given)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from callmesh.mux import Channel
from router.placement import LiveCall


@dataclass(frozen=True, slots=True)
class CallLimits:
    """The router's bounds on one call (from :class:`callmesh.config.RouterConfig`)."""

    max_unacked_frames: int  # unacknowledged frames other than audio, refused beyond
    max_unacked_audio_ms: int  # unacknowledged audio, the oldest dropped beyond
    connect_timeout_s: float  # without a node for this long, the call is refused
    max_unacked_bytes: int = 1 << 20  # bytes of those frames, refused beyond
    max_frames_per_s: float = 0.0  # the client's frame rate (router.limits.FrameRate); 0: any
    frame_burst: int = 1
    # More than this many relinks within ``relink_window_s`` end the call (0: no cap).
    max_relinks: int = 0
    relink_window_s: float = 60.0


class CallPlacement(Protocol):
    """Where the call runs (:class:`router.placement.Placement`)."""

    async def place(
        self, tenant: str, call_id: str, *, prefer_pin: bool, exclude: str | None = None
    ) -> str:
        """A node for the call; raises :class:`~router.ring.NoNodeAvailable`."""
        ...

    async def forget(self, tenant: str, call_id: str, node: str) -> None: ...

    async def confirm_alive(self, node: str) -> bool: ...

    def url(self, node: str) -> str | None: ...

    def suspect(self, node: str) -> None: ...

    def track(self, call: LiveCall, node: str) -> None: ...

    def untrack(self, call: LiveCall, node: str) -> None: ...


class NodeLinkOpener(Protocol):
    """Channels to nodes (:class:`router.node_links.NodeLinks`)."""

    async def open(self, node_id: str, url: str, call_id: str, start: str) -> Channel:
        """A channel for ``call_id`` whose first frame is ``start``; raises
        :class:`~router.node_links.NodeLinkError`."""
        ...
