"""The browser console in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright with the system browser), a fake microphone fed from a WAV, and a real local
cluster (embedded Redis and NATS, a router and two nodes as processes, in development mode).

The call is placed through the page: the greeting plays and the caller talks over it (the
page stops playback on ``clear``), the caller's words come back as a transcript, the agent
answers with audio that the page plays and marks. Then the page's button kills the owner
node; the page must show the new owner and the next turn must be answered by it. Last, the
call inspector shows the call's replay with both owners.

With the simulated providers the microphone says what the simulated recognizer reads:
text carried in tones (callmesh/audio/tones.py), synthesized here at 16 kHz. Chromium loops
the file, so the caller keeps talking. Screenshots go to ``out/console-test/``. The same
call in real speech (eSpeak NG, pocketsphinx, Silero VAD): test_console_browser_speech.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.console_page import Line, console_browser, why_no_browser, write_wav
from callmesh.audio.tones import tones_for_text
from localcluster.cluster import LocalCluster

if why_no_browser():
    pytest.skip(why_no_browser(), allow_module_level=True)

pytestmark = pytest.mark.timeout(240)

RATE = 16000
ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "console-test"
# The first words come while the greeting plays (a barge-in), the next ones after a pause.
SCRIPT = [Line(3.0, "Hi, my name is Alice"), Line(7.0, "I'd like a cleaning"), Line(7.0, "")]
WAIT_MS = 40_000


def tone_speech(text: str) -> np.ndarray:
    """What the simulated recognizer understands: ``text`` in tones, at 16 kHz."""
    return tones_for_text(text, RATE)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.3"}
    with LocalCluster(nodes=2, force_embedded=True, dev=True, env=env) as c:
        yield c


@pytest.fixture
def page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    wav = tmp_path / "mic.wav"
    write_wav(wav, SCRIPT, tone_speech)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with console_browser(tmp_path / "profile", wav) as (pg, errors):
        yield pg
    with capsys.disabled():
        print(f"\nconsole in tones: screenshots in {ARTIFACTS}")
    assert not errors, f"JavaScript errors on the page: {errors}"


def _stat(page: Any, name: str) -> Any:
    return page.evaluate(f"window.callmeshConsole.stats.{name}")


def _wait(page: Any, js: str, arg: Any = None) -> None:
    page.wait_for_function(js, arg=arg, timeout=WAIT_MS)


def test_a_call_from_the_browser_survives_its_node(cluster: LocalCluster, page: Any) -> None:
    page.goto(cluster.console_url)
    page.wait_for_selector("#mode-badge.dev")
    page.screenshot(path=str(ARTIFACTS / "01-idle.png"))

    page.click("#start-btn")
    _wait(page, "() => window.callmeshConsole.owner !== null")
    first_owner = page.inner_text("#owner-node")
    assert first_owner.startswith("node-")
    assert page.inner_text("#owner-epoch").isdigit()

    # The caller spoke over the greeting: the node sent clear and the page stopped it.
    _wait(page, "() => window.callmeshConsole.stats.clears >= 1")
    page.wait_for_selector('.msg.agent.interrupted[data-turn="0"]', timeout=WAIT_MS)
    # What the recognizer heard, then the answer: its text, its audio played and marked.
    page.wait_for_selector(".msg.user.final >> text=Hi, my name is Alice", timeout=WAIT_MS)
    _wait(page, "() => window.callmeshConsole.metrics.some(m => m.turn >= 1 && m.spoke)")
    _wait(page, "() => window.callmeshConsole.stats.marksEchoed >= 1")
    _wait(page, "() => window.callmeshConsole.stats.chunksPlayed >= 5")
    assert "Alice" in page.inner_text('.msg.agent[data-turn="1"] .text')
    assert page.locator('.msg.agent[data-turn="1"] .bar .seg').count() >= 2
    assert _stat(page, "framesSent") > 100
    # The page measured when the reply was heard after the caller stopped speaking.
    assert page.evaluate("window.callmeshConsole.heard.get(1)") > 0
    assert "heard here" in page.inner_text('.msg.agent[data-turn="1"] .latency')
    page.screenshot(path=str(ARTIFACTS / "02-call.png"))

    # Kill the owner from the page: the call moves, the page says so, the next turn is
    # answered by the new owner and heard.
    played_before = _stat(page, "chunksPlayed")
    page.click("#kill-btn")
    _wait(page, "(was) => document.getElementById('owner-node').textContent !== was", first_owner)
    new_owner = page.inner_text("#owner-node")
    assert new_owner.startswith("node-") and new_owner != first_owner
    assert f"moved to {new_owner}" in page.inner_text("#failover-banner")
    assert _stat(page, "owners") == 2
    _wait(
        page,
        "(node) => window.callmeshConsole.metrics.some(m => m.node === node && m.spoke)",
        new_owner,
    )
    _wait(page, f"() => window.callmeshConsole.stats.chunksPlayed > {played_before}")
    page.screenshot(path=str(ARTIFACTS / "03-after-failover.png"))
    call_id = page.evaluate("window.callmeshConsole.callId")

    # The inspector replays the call from its log: both owners, the epochs, the turns.
    page.goto(f"{cluster.router_url}/console/calls/{call_id}")
    page.wait_for_selector(".turn[data-turn='1']", timeout=WAIT_MS)
    owners = page.inner_text("#ownership")
    assert first_owner in owners and new_owner in owners and "failover" in owners
    assert page.locator("#chart .row").count() >= 2
    assert page.inner_text(".verdict") in ("verified", "not verified")
    page.screenshot(path=str(ARTIFACTS / "04-inspector.png"), full_page=True)
