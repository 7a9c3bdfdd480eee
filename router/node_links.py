"""The router's links to conversation nodes: one multiplexed WebSocket per node.

A link is opened the first time a call is placed on a node; every later call to that
node gets a :class:`~callmesh.mux.Channel` on it. Concurrent first calls share one
connection attempt. When the link is lost every call on it sees its channel end and
relinks as it would have after losing its own WebSocket; the next call to the node opens
a new link. A node declared dead has its link dropped at once, without waiting on a
process that may be paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from callmesh.link_auth import HEADER as LINK_AUTH_HEADER
from callmesh.link_auth import ROUTER_HEADER, LinkAuth
from callmesh.metric_names import NODE_LINKS_OPENED
from callmesh.mux import LINK_PATH, MAX_MESSAGE_BYTES, Channel, Mux
from callmesh.telemetry import Metrics

log = logging.getLogger("callmesh.router.links")

CONNECT_TIMEOUT_S = 2.0


class NodeLinkError(ConnectionError):
    """No link to the node could be opened."""


class NodeLinks:
    """Owns the links and their reader tasks; ``aclose()`` is idempotent."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        router_id: str,
        flush_delay_s: float,
        link_auth: LinkAuth | None = None,
    ) -> None:
        self._http = http
        # Signs each link's upgrade request (None: authentication explicitly disabled).
        self._auth = link_auth
        self._flush_delay = flush_delay_s
        self._metrics = metrics
        self._router_id = router_id
        self._links: dict[str, tuple[str, Mux, asyncio.Task[None]]] = {}
        self._connecting: dict[tuple[str, str], asyncio.Task[Mux]] = {}

    def __repr__(self) -> str:
        return f"<NodeLinks [{len(self._links)} links, {len(self._connecting)} connecting]>"

    def summary(self) -> dict[str, str]:
        return {node: repr(mux) for node, (_, mux, _) in self._links.items()}

    def heard_from(self, node_id: str) -> float | None:
        """When the node last sent on its open link (monotonic); None without one."""
        current = self._links.get(node_id)
        if current is None or current[1].closed:
            return None
        return current[1].last_heard

    async def open(self, node_id: str, url: str, call_id: str, start: str) -> Channel:
        """A channel for ``call_id`` on the node's link, its first frame ``start``."""
        mux = await self._link(node_id, url)
        return await mux.open(call_id, start)

    async def _link(self, node_id: str, url: str) -> Mux:
        current = self._links.get(node_id)
        if current is not None and current[0] == url and not current[1].closed:
            return current[1]
        key = (node_id, url)
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._connect(node_id, url), name=f"link-connect:{node_id}"
            )
            self._connecting[key] = task
            task.add_done_callback(lambda _: self._connecting.pop(key, None))
        # Shielded: a caller that gives up must not cancel the attempt the others share.
        return await asyncio.shield(task)

    async def _connect(self, node_id: str, url: str) -> Mux:
        headers = {ROUTER_HEADER: self._router_id}
        if self._auth is not None:
            headers[LINK_AUTH_HEADER] = self._auth.sign(self._router_id, LINK_PATH)
        try:
            ws = await self._http.ws_connect(
                f"{url}{LINK_PATH}",
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                max_msg_size=MAX_MESSAGE_BYTES,
                autoping=True,
                headers=headers,
                # Audio is base64 noise to deflate; compressing it would cost more CPU
                # than the router's whole job.
                compress=0,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise NodeLinkError(f"link to {node_id} failed: {exc}") from exc
        self.drop(node_id, "replaced")
        mux = Mux(ws, node_id, self._metrics, flush_delay_s=self._flush_delay)
        mux.start()
        reader = asyncio.get_running_loop().create_task(mux.run(), name=f"link:{node_id}")
        self._links[node_id] = (url, mux, reader)
        reader.add_done_callback(lambda _: self._forget(node_id, mux))
        self._metrics.inc(NODE_LINKS_OPENED)
        log.info("node link open", extra={"fields": {"node": node_id, "url": url}})
        return mux

    def _forget(self, node_id: str, mux: Mux) -> None:
        current = self._links.get(node_id)
        if current is not None and current[1] is mux:
            del self._links[node_id]
        if mux.lost is not None:
            log.info("node link ended", extra={"fields": {"node": node_id, "why": mux.lost}})

    def drop(self, node_id: str, why: str) -> None:
        """End the node's link now: its calls see their channels end."""
        current = self._links.pop(node_id, None)
        if current is not None:
            _, mux, reader = current
            mux.abandon(why)
            reader.cancel()  # its cleanup closes the socket, bounded by ws_close

    async def aclose(self) -> None:
        connecting = list(self._connecting.values())
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        links, self._links = self._links, {}
        for _, mux, reader in links.values():
            mux.abandon("router closing")
            reader.cancel()
        for _, mux, reader in links.values():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, return_exceptions=True)
            await mux.aclose()
