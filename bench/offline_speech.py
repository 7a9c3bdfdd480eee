"""Offline speech, measured: accuracy and CPU of eSpeak NG, Silero VAD and pocketsphinx.

Sentences a caller of the demo clinic would say are synthesised by the eSpeak provider and
recognised back by the pocketsphinx provider with the demo tenant's domain language model,
at 16 kHz PCM (a browser) and 8 kHz mu-law (a telephone). Reported per component:

* ``cores_per_stream``: CPU seconds per second of audio, i.e. the share of a core one
  real-time stream keeps busy (CPU time of this process, all threads, plus that of the
  recognizer's decoding processes);
* ``real_time_factor``: wall seconds per second of audio, audio fed as fast as it goes;
* word error rate over the sentence set, and the confidence of out-of-domain speech;
* the event loop's worst lag while ``--streams`` calls are decoded at real-time pace
  (decoding runs on a thread pool, so the loop should stay responsive).

    python bench/offline_speech.py [--streams 4] [--json out/offline_speech.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from callmesh.audio.codec import mulaw_decode_array, pcm16_to_array
from callmesh.audio.format import AudioChunk, AudioEncoding
from conversation_node.audio.vad import EnergyVAD
from conversation_node.providers.base import STTEvent, STTEventKind
from conversation_node.providers.espeak_tts import EspeakTTS
from conversation_node.providers.pocketsphinx_stt import PocketsphinxSTT
from conversation_node.providers.silero_vad import SileroVAD

CALLER_SENTENCES = (
    "Hi, I'd like to book a cleaning.",
    "My name is Maria Lopez.",
    "Can I come in on Tuesday at 3 pm?",
    "Yes, please book it.",
    "How much is a whitening?",
    "What time do you open on Saturday?",
    "I need to cancel my appointment.",
    "Do you take insurance?",
    "Where is the Riverside office?",
    "I would like a checkup next Monday morning.",
    "Is there parking at the downtown office?",
    "No, that's not right.",
    "Thursday at 10:30 am works for me.",
    "My son has a toothache, is it an emergency?",
    "Can I reschedule to Friday afternoon?",
    "How much does a filling cost?",
    "Do you see children?",
    "Thank you, goodbye.",
    "This is John Smith calling about my crown.",
    "What are your opening hours?",
    "I'd like to book a consultation for Wednesday at 9 am.",
    "Can I pay with a credit card?",
    "Sounds good, thanks.",
    "Is the office open on Sunday?",
)
OUT_OF_DOMAIN = (
    "I want to order a large pepperoni pizza with extra cheese.",
    "Please transfer five hundred euros to my savings account.",
    "The quick brown fox jumps over the lazy dog.",
)
_TOKEN = re.compile(r"[a-z0-9:']+")


def words(text: str) -> list[str]:
    """Lower-case words, times kept whole ("3:30"), punctuation dropped: what WER compares."""
    return _TOKEN.findall(text.lower())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions, insertions, deletions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


async def speak(tts: EspeakTTS, text: str) -> bytes:
    return b"".join([chunk.data async for chunk in tts.synthesize(text)])


def samples_of(data: bytes, encoding: AudioEncoding) -> np.ndarray:
    return mulaw_decode_array(data) if encoding is AudioEncoding.MULAW else pcm16_to_array(data)


def with_silence(audio: bytes, encoding: AudioEncoding, rate: int) -> bytes:
    """0.4 s of silence before, 0.8 s after: a caller's pause, and room for the endpoint."""
    zero = b"\xff" if encoding is AudioEncoding.MULAW else b"\x00\x00"
    gap = zero * (rate * 4 // 10)
    return gap + audio + gap * 2


async def hear(
    stt: PocketsphinxSTT,
    audio: bytes,
    encoding: AudioEncoding = AudioEncoding.PCM16,
    rate: int = 16000,
    *,
    pace_s: float = 0.0,
    tenant: str = "demo",
) -> list[STTEvent]:
    """One utterance of a caller of ``tenant`` through a new stream in 20 ms frames (every
    ``pace_s`` if > 0), with silence around it; the events up to its UTTERANCE_END."""
    data = with_silence(audio, encoding, rate)
    frame = rate * (1 if encoding is AudioEncoding.MULAW else 2) // 50
    stream = await stt.open(encoding, rate, tenant=tenant)
    try:
        for i in range(0, len(data), frame):
            stream.send_audio_nowait(AudioChunk(data[i : i + frame], encoding, rate))
            if pace_s:
                await asyncio.sleep(pace_s)
        events = []
        async with asyncio.timeout(60):
            async for event in stream.events():
                events.append(event)
                if event.kind is STTEventKind.UTTERANCE_END:
                    break
        return events
    finally:
        await stream.aclose()


async def _tts(encoding: AudioEncoding, rate: int) -> tuple[list[bytes], dict[str, Any]]:
    tts = EspeakTTS(encoding=encoding, sample_rate=rate)
    await speak(tts, "warm up")  # loads the library and the voice
    cpu0, wall0, firsts = time.process_time(), time.perf_counter(), []
    audio = []
    for sentence in CALLER_SENTENCES:
        started, parts = time.perf_counter(), []
        async for chunk in tts.synthesize(sentence):
            if not parts:
                firsts.append(time.perf_counter() - started)
            parts.append(chunk.data)
        audio.append(b"".join(parts))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    seconds = sum(len(samples_of(a, encoding)) for a in audio) / rate
    return audio, {
        "audio_s": round(seconds, 2),
        "cores_per_stream": round(cpu / seconds, 4),
        "real_time_factor": round(wall / seconds, 4),
        "first_chunk_ms_p50": round(1000 * float(np.median(firsts)), 1),
    }


def _vad(audio: list[bytes]) -> dict[str, Any]:
    pcm = np.concatenate(
        [pcm16_to_array(with_silence(a, AudioEncoding.PCM16, 16000)) for a in audio]
    )
    seconds = len(pcm) / 16000
    out = {}
    for name, vad in (("silero", SileroVAD()), ("energy", EnergyVAD(sample_rate=16000))):
        cpu0 = time.process_time()
        for i in range(0, len(pcm), 320):
            vad.push_samples(pcm[i : i + 320])
        out[name] = {"cores_per_stream": round((time.process_time() - cpu0) / seconds, 5)}
    return out


async def _cpu(stt: PocketsphinxSTT) -> float:
    """CPU seconds of this process and of the recognizer's decoding processes."""
    return time.process_time() + await asyncio.to_thread(stt.worker_cpu_s)


async def _stt(audio: list[bytes], encoding: AudioEncoding, rate: int, vad: str) -> dict[str, Any]:
    stt = PocketsphinxSTT(vad=vad)
    try:
        await hear(stt, audio[0], encoding, rate)  # builds the model, loads a decoder
        errors = total = 0
        misheard = []
        cpu0, wall0 = await _cpu(stt), time.perf_counter()
        for sentence, data in zip(CALLER_SENTENCES, audio, strict=True):
            text = (await hear(stt, data, encoding, rate))[-1].text
            errors += edit_distance(words(sentence), words(text))
            total += len(words(sentence))
            if words(text) != words(sentence):
                misheard.append({"said": sentence, "heard": text})
        cpu, wall = await _cpu(stt) - cpu0, time.perf_counter() - wall0
        width = 1 if encoding is AudioEncoding.MULAW else 2
        seconds = sum(len(with_silence(a, encoding, rate)) for a in audio) / (width * rate)
        return {
            "vad": vad,
            "audio_s": round(seconds, 2),
            "wer": round(errors / total, 4),
            "words": total,
            "cores_per_stream": round(cpu / seconds, 4),
            "real_time_factor": round(wall / seconds, 4),
            "misheard": misheard,
        }
    finally:
        await stt.aclose()


async def _out_of_domain(tts: EspeakTTS) -> list[dict[str, Any]]:
    stt = PocketsphinxSTT()
    try:
        rows = []
        for sentence in (*OUT_OF_DOMAIN, CALLER_SENTENCES[15]):
            end = (await hear(stt, await speak(tts, sentence)))[-1]
            rows.append({"said": sentence, "heard": end.text, "confidence": end.confidence})
        return rows
    finally:
        await stt.aclose()


async def _loop_lag(audio: list[bytes], streams: int) -> dict[str, Any]:
    """Worst event-loop lag while ``streams`` calls are decoded at real-time pace."""
    stt = PocketsphinxSTT()
    lags: list[float] = []

    async def tick() -> None:
        while True:
            due = time.perf_counter() + 0.01
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - due)

    try:
        await hear(stt, audio[0])
        # Every stream's decoder exists before the clock starts (a process start is not
        # what this measures).
        opened = [await stt.open(AudioEncoding.PCM16, 16000, tenant="demo") for _ in range(streams)]
        for stream in opened:
            await stream.aclose()
        ticker = asyncio.create_task(tick(), name="lag-ticker")
        cpu0, wall0 = await _cpu(stt), time.perf_counter()
        await asyncio.gather(*(hear(stt, audio[i], pace_s=0.02) for i in range(streams)))
        cpu, wall = await _cpu(stt) - cpu0, time.perf_counter() - wall0
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
    finally:
        await stt.aclose()
    return {
        "streams": streams,
        "loop_lag_ms_max": round(1000 * max(lags), 1),
        "loop_lag_ms_p99": round(1000 * float(np.percentile(lags, 99)), 1),
        "cpu_cores_used": round(cpu / wall, 3),
    }


async def run(streams: int) -> dict[str, Any]:
    audio16, tts16 = await _tts(AudioEncoding.PCM16, 16000)
    audio8, tts8 = await _tts(AudioEncoding.MULAW, 8000)
    return {
        "benchmark": "offline_speech",
        "sentences": len(CALLER_SENTENCES),
        "tts": {"pcm16_16k": tts16, "mulaw_8k": tts8},
        "vad": _vad(audio16),
        "stt": {
            "pcm16_16k_silero": await _stt(audio16, AudioEncoding.PCM16, 16000, "silero"),
            "pcm16_16k_energy": await _stt(audio16, AudioEncoding.PCM16, 16000, "energy"),
            "mulaw_8k_silero": await _stt(audio8, AudioEncoding.MULAW, 8000, "silero"),
        },
        "out_of_domain": await _out_of_domain(EspeakTTS()),
        "concurrency": await _loop_lag(audio16, streams),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="concurrent paced streams")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args()
    result = asyncio.run(run(args.streams))
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
