"""The browser console talked to in real speech: headless Chromium whose fake microphone
plays sentences spoken by the eSpeak NG provider, against a local cluster whose nodes hear
with pocketsphinx (Silero VAD endpointing) and speak with eSpeak NG (``speech="offline"``,
what ``callmesh up`` runs).

The caller books a cleaning in five sentences, each followed by silence long enough for
the agent's reply to play. The page must show what the caller said (the recognizer's
words, allowing for a misheard word), play the agent's replies and echo their marks; then
the page's button kills the node that owns the call, and the page must show the new owner
and the next turn answered by it, from what the caller said after the kill.

Screenshots, the microphone's WAV and what the page showed go to
``out/console-test/speech/``.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.console_page import (
    Line,
    console_browser,
    conversation,
    espeak_voice,
    why_no_browser,
    why_no_offline_speech,
    write_wav,
)
from bench.offline_speech import edit_distance, words
from localcluster.cluster import LocalCluster

if why_no_browser() or why_no_offline_speech():
    pytest.skip(why_no_browser() or why_no_offline_speech(), allow_module_level=True)

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "console-test" / "speech"
# The greeting (about 3.5 s of speech) plays before the caller speaks; each reply (up to
# about 4.5 s) has 7 s. No commas: eSpeak pauses at one, and the endpointer would cut the
# sentence there. Sentences the demo's recognizer gets right most of the time (see
# bench/offline_speech.py): names are its weak point.
SCRIPT = [
    Line(5.5, "My name is Sarah Johnson."),
    Line(7.0, "I would like to book a cleaning."),
    Line(7.0, "Can I come in on Tuesday at 3 pm?"),
    Line(7.0, "Yes please book it."),
    Line(7.0, "Thank you goodbye."),
    Line(7.0, ""),
]
SAID = [line.text for line in SCRIPT if line.text]
# A sentence counts as heard when at most a quarter of its words were misheard.
MAX_WER = 0.25
WAIT_MS = 60_000


def closest(text: str) -> tuple[str, float]:
    """The script sentence ``text`` is closest to, and its word error rate against it."""
    heard = words(text)
    return min(
        ((said, edit_distance(words(said), heard) / len(words(said))) for said in SAID),
        key=lambda pair: pair[1],
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=2, force_embedded=True, dev=True, speech="offline") as c:
        yield c


@pytest.fixture
def page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wav = ARTIFACTS / "mic.wav"
    write_wav(wav, SCRIPT, espeak_voice())
    with console_browser(tmp_path / "profile", wav) as (pg, errors):
        yield pg
    with capsys.disabled():
        print(f"\nconsole in real speech: screenshots, WAV and transcript in {ARTIFACTS}")
    assert not errors, f"JavaScript errors on the page: {errors}"


def _wait(page: Any, js: str, arg: Any = None) -> None:
    page.wait_for_function(js, arg=arg, timeout=WAIT_MS)


# Everything the agent sent so far has been played.
PLAYED = "() => window.callmeshConsole.player.playhead <= window.callmeshConsole.ctx.currentTime"


def _providers(url: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{url}/v1/status", timeout=5) as resp:
        providers: dict[str, str] = json.loads(resp.read())["providers"]
    return providers


def _answered_by(page: Any, node: str) -> int:
    """The first turn after the greeting that ``node`` answered with audio (0 if none)."""
    turn: int = page.evaluate(
        """(node) => {
          const m = window.callmeshConsole.metrics.find(
            (m) => m.node === node && m.spoke && m.turn >= 1);
          return m ? m.turn : 0;
        }""",
        node,
    )
    return turn


def _what_it_answered(shown: list[dict[str, Any]], turn: int) -> str:
    """The caller's last final transcript before the agent's ``turn``: what it answers."""
    before = shown[: next(i for i, m in enumerate(shown) if m["turn"] == turn)]
    finals = [m["text"] for m in before if m["who"] == "user" and m["final"]]
    assert finals, f"turn {turn} answers nothing the page showed: {shown}"
    return str(finals[-1])


def test_a_spoken_call_from_the_browser_survives_its_node(cluster: LocalCluster, page: Any) -> None:
    for node in cluster.nodes:
        providers = _providers(node.url)
        assert (providers["stt"], providers["tts"]) == ("pocketsphinx-stt", "espeak-tts")
    page.goto(cluster.console_url)
    page.wait_for_selector("#mode-badge.dev")
    page.click("#start-btn")
    _wait(page, "() => window.callmeshConsole.owner !== null")
    first_owner = page.inner_text("#owner-node")

    # The first sentence heard, answered, the answer played to its end and marked.
    _wait(page, "() => window.callmeshConsole.metrics.some(m => m.turn >= 1 && m.spoke)")
    _wait(page, "() => window.callmeshConsole.heard.get(1) > 0")
    _wait(page, PLAYED)
    stats = page.evaluate("window.callmeshConsole.stats")
    assert stats["marksEchoed"] >= 1 and stats["chunksPlayed"] >= 10, stats
    assert stats["interims"] >= 1, "no interim transcript: pocketsphinx decodes as it hears"
    page.screenshot(path=str(ARTIFACTS / "01-first-reply.png"))

    # Kill the owner from the page: the call moves, and the next thing the caller says is
    # heard and answered by the new owner.
    played_before = page.evaluate("window.callmeshConsole.stats.chunksPlayed")
    page.click("#kill-btn")
    _wait(page, "(was) => document.getElementById('owner-node').textContent !== was", first_owner)
    new_owner = page.inner_text("#owner-node")
    assert new_owner.startswith("node-") and new_owner != first_owner
    assert f"moved to {new_owner}" in page.inner_text("#failover-banner")
    _wait(
        page,
        "(node) => window.callmeshConsole.metrics.some(m => m.node === node && m.spoke)",
        new_owner,
    )
    _wait(page, f"() => window.callmeshConsole.stats.chunksPlayed > {played_before + 5}")
    page.screenshot(path=str(ARTIFACTS / "02-after-failover.png"))

    # The third sentence heard and answered: the conversation as the page shows it.
    page.wait_for_selector(".msg.user.final >> text=Tuesday", timeout=WAIT_MS)
    _wait(page, "() => window.callmeshConsole.metrics.some(m => m.turn >= 3 && m.spoke)")
    shown = conversation(page)
    (ARTIFACTS / "conversation.json").write_text(json.dumps(shown, indent=2) + "\n")
    page.screenshot(path=str(ARTIFACTS / "03-conversation.png"), full_page=True)

    finals = [m["text"] for m in shown if m["who"] == "user" and m["final"]]
    heard = {said for said, wer in map(closest, finals) if wer <= MAX_WER}
    assert len(heard) >= 2, f"the caller's words were not heard: {finals}"
    after_kill = _what_it_answered(shown, _answered_by(page, new_owner))
    said, wer = closest(after_kill)
    assert wer <= MAX_WER, f"the new owner answered {after_kill!r}, closest to {said!r}"

    # The call's saved state holds what the caller's voice alone told it (the inspector
    # replays it from the event log): the service, then the day.
    call_id = page.evaluate("window.callmeshConsole.callId")
    page.goto(f"{cluster.router_url}/console/calls/{call_id}")
    page.wait_for_selector(".turn[data-turn='3']", timeout=WAIT_MS)
    owners = page.inner_text("#ownership")
    assert first_owner in owners and new_owner in owners
    replay = page.inner_text("body")
    assert "service = cleaning" in replay and "date = Tuesday" in replay, replay
    page.screenshot(path=str(ARTIFACTS / "04-inspector.png"), full_page=True)
