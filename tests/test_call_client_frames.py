"""The native client reads a reply's audio frames without parsing them when they come in
the nodes' spelling, and counts them exactly as it counts any other spelling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from callmesh.protocol import agent_audio_frame
from callmesh_client.client import CallClient


@dataclass
class _Msg:
    type: aiohttp.WSMsgType
    data: str = ""
    extra: Any = None


class _Socket:
    def __init__(self, texts: list[str]) -> None:
        self._msgs = [_Msg(aiohttp.WSMsgType.TEXT, t) for t in texts]
        self._msgs.append(_Msg(aiohttp.WSMsgType.CLOSED))
        self.close_code = 1000

    async def receive(self) -> _Msg:
        return self._msgs.pop(0)


async def _read(texts: list[str]) -> CallClient:
    client = CallClient("http://127.0.0.1:1", "call-1")
    client._ws = _Socket(texts)  # type: ignore[assignment]
    await client._read()
    return client


async def test_audio_in_either_spelling_counts_the_same() -> None:
    data = ["AAAA" * 100, "AAA=", "AA=="]
    canonical = [agent_audio_frame(3, n, "mulaw", 8000, d) for n, d in enumerate(data)]
    other = [
        json.dumps({"data": d, "type": "agent_audio", "n": n, "turn": 3, "resumed": True})
        for n, d in enumerate(data)
    ]
    fast, slow = await _read(canonical), await _read(other)
    for client in (fast, slow):
        t = client._turns[3]
        assert t.audio_bytes == 300 + 3 + 3
        assert len(t.frame_times) == 3 and t.first_audio_at == t.frame_times[0]
