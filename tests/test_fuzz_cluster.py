"""Fuzzing a real router and node over real sockets while a legitimate call runs.

A smaller generated stream than tests/test_fuzz_parsers.py, sent where an attacker would
send it: native frames on a call's WebSocket (before and after ``start``), Twilio Media
Streams messages, Twilio voice webhook form bodies, and the HTTP endpoints with garbage
in their paths and queries. Meanwhile a scripted booking call runs through the same
router. What must hold: every process stays up and answers /healthz, each bad input gets
an error frame or a close code (never ``internal``), no traceback reaches a log, and the
legitimate call's turns are all answered in order.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from callmesh_client.client import CallClient
from localcluster.cluster import LocalCluster
from router.twilio_webhook import MEDIA_PATH, VOICE_PATH
from tests.fuzz_inputs import (
    fuzz_settings,
    hostile_text,
    json_values,
    native_wire,
    twilio_messages,
)

pytestmark = pytest.mark.timeout(300)

# Close codes that are clear refusals (docs/protocol.md); 1000/1001 end a call normally.
CLEAR_CLOSES = {1000, 1001, 1009, 4400, 4401, 4403, 4408, 4429, 4503}
ROUNDS = 120  # examples; each a few inputs on every entry point


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # A router configured for Twilio (public URL, auth token): the webhook's forms reach its
    # signature check instead of stopping at "not configured".
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": "0.05",
        "CALLMESH_PUBLIC_URL": "http://127.0.0.1:9",
        "TWILIO_AUTH_TOKEN": "fuzz-twilio-auth-token",
    }
    with LocalCluster(nodes=1, force_embedded=True, env=env) as c:
        yield c


class Seen:
    """What the attacker's connections got back."""

    def __init__(self) -> None:
        self.sent = 0
        self.errors: list[dict[str, object]] = []
        self.closes: list[int] = []


async def drain(ws: aiohttp.ClientWebSocketResponse, seen: Seen, wait_s: float) -> bool:
    """Read what arrived; False once the connection is closed."""
    while True:
        try:
            msg = await ws.receive(timeout=wait_s)
        except TimeoutError:
            return True
        if msg.type is aiohttp.WSMsgType.TEXT:
            frame = json.loads(msg.data)
            if frame.get("type") == "error":
                seen.errors.append(frame)
            continue
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        ):
            seen.closes.append(ws.close_code or 1006)
            return False
        return not ws.closed


async def native_attack(url: str, frames: list[str], seen: Seen, tag: str) -> None:
    async with aiohttp.ClientSession() as http:
        n = 0
        ws: aiohttp.ClientWebSocketResponse | None = None
        for i, raw in enumerate(frames):
            if ws is None or ws.closed:
                n += 1
                ws = await http.ws_connect(f"{url}/v1/calls/fz-{tag}-{n}", max_msg_size=0)
                if i % 2:  # half the time the garbage comes after a proper start
                    start = {"type": "start", "seq": 1, "tenant": "demo", "caller": "fz"}
                    await ws.send_str(json.dumps(start))
            await ws.send_str(raw)
            seen.sent += 1
            await drain(ws, seen, 0.02)
        if ws is not None and not ws.closed:
            # The node answers a frame within milliseconds here (latency scale 0.05); the
            # wait bounds the example's time, which is most of this test's.
            await drain(ws, seen, 0.15)
            await ws.close()


async def twilio_attack(url: str, messages: list[str], seen: Seen, tag: str) -> None:
    start = {
        "event": "start",
        "streamSid": f"MZ{tag}",
        "start": {"callSid": f"CA{tag}", "customParameters": {"tenant": "demo"}},
    }
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}{MEDIA_PATH}", max_msg_size=0)
        await ws.send_str(json.dumps(start))
        for data in messages:
            if ws.closed:
                break
            await ws.send_str(data)
            seen.sent += 1
            await drain(ws, seen, 0.01)
        await drain(ws, seen, 0.15)
        await ws.close()


async def http_attack(url: str, forms: list[dict[str, str]], paths: list[str], seen: Seen) -> None:
    async with aiohttp.ClientSession() as http:
        for form in forms:
            # Encoded here: the server must cope with what aiohttp's client would refuse.
            body = urlencode(form, errors="surrogatepass").encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            async with http.post(f"{url}{VOICE_PATH}", data=body, headers=headers) as resp:
                assert resp.status < 500, (resp.status, form)
            seen.sent += 1
        for path in paths:
            for base in ("/v1/status", "/metrics", "/healthz", "/console/api/calls", "/v1/calls"):
                async with http.get(f"{url}{base}/{path}?q={path}") as resp:
                    assert resp.status < 500, (resp.status, base, path)
                seen.sent += 1


async def healthy(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession() as http:
        for proc in [cluster.router, *cluster.nodes]:
            assert proc is not None and proc.alive(), f"{proc} exited"
            async with http.get(f"{proc.url}/healthz") as resp:
                assert resp.status == 200


forms = st.dictionaries(
    st.sampled_from(["CallSid", "From", "To", "AccountSid", "tenant"]) | hostile_text,
    hostile_text,
    max_size=5,
)
paths = hostile_text.map(lambda s: quote(s, safe=""))
SMALL_TALK = ["What time do you open?", "Thanks, that's great", "Perfect, thank you"]


class LegitCaller:
    """A call that keeps talking, in a thread of its own, for as long as the fuzzing runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.turns: list[int] = []
        self.said = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> LegitCaller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        try:
            async with CallClient(self.url, "fz-legit", timeout_s=30) as client:
                await client.start("demo", "legit-caller")
                while not self._stop.is_set():
                    self.said += 1
                    reply = await client.say(SMALL_TALK[self.said % len(SMALL_TALK)])
                    self.turns.append(reply.turn)
                    await asyncio.sleep(0.2)
                await client.hangup()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


@pytest.fixture(scope="module")
def legit(cluster: LocalCluster) -> Iterator[LegitCaller]:
    with LegitCaller(cluster.router_url) as caller:
        yield caller


examples = iter(range(10**6))


@fuzz_settings(ROUNDS, shrink=False)
@given(
    st.lists(native_wire, min_size=1, max_size=3),
    st.lists(json_values.map(json.dumps), max_size=1),
    st.lists(twilio_messages("MZx", "CAx"), min_size=1, max_size=3),
    st.lists(forms, max_size=1),
    st.lists(paths, max_size=1),
)
def test_hostile_traffic_beside_a_legitimate_call(
    cluster: LocalCluster,
    legit: LegitCaller,
    native: list[str],
    pre_start: list[str],
    twilio: list[str],
    webhook_forms: list[dict[str, str]],
    http_paths: list[str],
) -> None:
    tag = str(next(examples))

    async def scenario() -> Seen:
        seen = Seen()
        url = cluster.router_url
        await asyncio.gather(
            native_attack(url, native, seen, f"n{tag}"),
            native_attack(url, pre_start, seen, f"p{tag}"),
            twilio_attack(url, twilio, seen, f"t{tag}"),
            http_attack(url, webhook_forms, http_paths, seen),
        )
        return seen

    seen = asyncio.run(scenario())
    assert seen.sent >= len(native) + len(pre_start)
    internal = [e for e in seen.errors if e.get("code") == "internal"]
    assert not internal, internal
    assert set(seen.closes) <= CLEAR_CLOSES, seen.closes
    assert legit.error is None, repr(legit.error)


def test_processes_healthy_and_legitimate_call_answered(
    cluster: LocalCluster, legit: LegitCaller
) -> None:
    # Runs after the fuzzing above (file order).
    asyncio.run(healthy(cluster))
    turns, said = list(legit.turns), legit.said
    assert legit.error is None, repr(legit.error)
    assert len(turns) >= 3 and said - len(turns) <= 1  # at most the turn still under way
    assert turns == list(range(1, len(turns) + 1))  # every turn answered, in order


def test_no_traceback_in_any_log(cluster: LocalCluster) -> None:
    assert cluster.log_dir is not None
    for path in cluster.log_dir.glob("*.log"):
        text = path.read_text(errors="replace")
        assert "Traceback" not in text, f"{path.name}:\n{text[-3000:]}"
