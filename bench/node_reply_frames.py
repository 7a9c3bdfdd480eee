"""Node CPU per spoken reply: a fixed three-sentence reply said through the turn pipeline
(:class:`TurnPipeline`, simulated model and voice) into the call's replies' outlet
(:class:`SaidReplies` → :class:`Replies` → wire text), as a node in text mode speaks it.
Prints one JSON object.

    .venv/bin/python bench/node_reply_frames.py [--replies 1000] [--runs 7] [--chunk-ms 500]
        [--retain] [--json PATH]

The voice's chunks are ``--chunk-ms`` long (the load test's 500 ms: about 5 KB of base64 a
frame); its latency is zero, so the figure is the process time of the speak path alone
(frames built, numbered, written as text; no link). ``--retain`` keeps each reply's frames
for a resume, as a node that clears at the caller's first sound does. The figure is the
median over ``--runs`` runs of ``--replies`` replies each; ``json_audio_frames`` counts the
audio frames that did not go out in the template spelling (the ones a router parses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from callmesh.config import SimulatedLatency
from callmesh.protocol import read_agent_audio
from conversation_node.pipeline import TEXT_MODE, Budgets, TurnPipeline
from conversation_node.providers.simulated import SimulatedLLM, SimulatedTTS
from conversation_node.replies import Replies
from conversation_node.said_replies import SaidReplies

# Three sentences, about five seconds of speech: the shape of a load-test turn.
REPLY = "Sure, Ana, we can do that. What day works best for you? We open at nine."
BYTES_PER_MS = 8.0  # mu-law 8 kHz, the simulated voice's format


async def measure(replies: int, runs: int, chunk_ms: int, retain: bool) -> dict[str, Any]:
    none = SimulatedLatency(stt_ms=0, llm_first_token_ms=0, llm_token_ms=0, tts_first_chunk_ms=0)
    pipeline = TurnPipeline(
        SimulatedLLM(none), SimulatedTTS(none, chunk_ms=chunk_ms), None, Budgets()
    )
    wire: list[str] = []

    async def send(raw: str) -> None:
        wire.append(raw)

    outlet = Replies(send, retain=retain)
    said = SaidReplies(
        SimpleNamespace(bytes_per_ms=BYTES_PER_MS),  # type: ignore[arg-type]
        speaker=pipeline,
        replies=outlet,
        closer=None,  # type: ignore[arg-type]
        send=send,
        counters=None,  # type: ignore[arg-type]
    )

    async def speak(turn: int) -> None:
        pb, _ = outlet.start_reply(turn)
        await pipeline.speak(REPLY, said.emit, TEXT_MODE)
        pb.finished_sending = True

    for turn in range(50):  # warm up: imports, caches, the allocator
        await speak(turn)
    wire.clear()
    await speak(1)
    kinds: dict[str, int] = {}
    for raw in wire:
        kind = json.loads(raw)["type"]
        kinds[kind] = kinds.get(kind, 0) + 1
    json_audio = sum(1 for raw in wire if '"agent_audio"' in raw and read_agent_audio(raw) is None)
    per_reply = {"frames": kinds, "bytes": sum(map(len, wire)), "json_audio_frames": json_audio}
    times = []
    for _ in range(runs):
        wire.clear()
        t0 = time.process_time()
        for turn in range(replies):
            await speak(turn)
        times.append((time.process_time() - t0) / replies * 1e6)
    return {
        "reply": REPLY,
        "chunk_ms": chunk_ms,
        "retain": retain,
        "per_reply": per_reply,
        "cpu_us_per_reply": round(statistics.median(times), 1),
        "cpu_us_per_reply_min": round(min(times), 1),
        "runs": [round(t, 1) for t in times],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replies", type=int, default=1000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--chunk-ms", type=int, default=500)
    p.add_argument("--retain", action="store_true")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    result = uvloop.run(measure(args.replies, args.runs, args.chunk_ms, args.retain))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
