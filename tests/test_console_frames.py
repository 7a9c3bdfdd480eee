"""What the console reads off the native protocol: a wide-band (16 kHz pcm16) voice call to a
real node gets ``transcript`` frames (interim, then final) and its reply in its own format;
the router's ``owner`` frame for a relink."""

from __future__ import annotations

import base64
import json

import numpy as np
from node_harness import node_call, running_node, simulated_providers

from callmesh.audio.tones import tones_for_text
from callmesh.protocol import Out, transcript_frame
from router.upstream import owner_frame

RATE = 16000
FRAME = 640  # 20 ms of 16 kHz pcm16


def _pcm16(samples: np.ndarray) -> bytes:
    return samples.astype("<i2").tobytes()


async def test_a_16khz_voice_call_gets_transcripts_and_its_reply(
    redis_url: str, nats_url: str
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "wide-1", via="socket") as call,
    ):
        await call.send(
            type="start",
            tenant="demo",
            caller="ana",
            audio={"encoding": "pcm16", "sample_rate": RATE},
        )
        await call.turn(0)
        quiet = np.zeros(RATE // 2, dtype=np.int16)
        audio = _pcm16(np.concatenate([quiet, tones_for_text("Hi, my name is Ana", RATE), quiet]))
        for i in range(0, len(audio), FRAME):
            await call.send(type="audio", data=base64.b64encode(audio[i : i + FRAME]).decode())
        final = await call.wait_for(lambda f: f["type"] == "transcript" and f["final"])
        assert final["text"] == "Hi, my name is Ana"
        assert 0.5 <= final["confidence"] <= 1.0
        interims = [f for f in call.frames if f["type"] == "transcript" and not f["final"]]
        assert interims and all("Hi, my name is Ana".startswith(f["text"]) for f in interims)
        await call.turn(1)
        assert "Ana" in call.reply_text(1)
        chunks = call.of_turn(1, "agent_audio")
        assert chunks and all(c["encoding"] == "pcm16" and c["sample_rate"] == RATE for c in chunks)
        # The final transcript precedes the reply it starts.
        kinds = [f["type"] for f in call.frames]
        first_reply = next(i for i, f in enumerate(call.frames) if f.get("turn") == 1)
        assert kinds.index("transcript") < first_reply


def test_transcript_frame_fields() -> None:
    frame = json.loads(transcript_frame(3, "book it", True, 0.91234))
    assert frame == {
        "type": Out.TRANSCRIPT.value,
        "turn": 3,
        "text": "book it",
        "final": True,
        "confidence": 0.912,
    }


def test_owner_frame_names_the_new_owner_and_why() -> None:
    ready = {"type": "ready", "turn": 4, "call_id": "c", "node": "node-2", "epoch": 7}
    assert owner_frame(ready, "failover") == {
        "type": Out.OWNER.value,
        "turn": 4,
        "node": "node-2",
        "epoch": 7,
        "reason": "failover",
    }
