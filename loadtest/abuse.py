"""``python -m loadtest abuse``: legitimate calls while a flood hits every entry point.

Two phases with the same legitimate load (scripted calls through the router), repeated
``--rounds`` times so that background load on a shared machine skews both alike: quiet,
then with the flood: bad tokens (none, expired, wrong signature, another tenant's),
takeover attempts (a second ``start`` for a live call's id without its resume secret),
malformed and oversized frames, idle connections that never ``start``, connections past
the per-router/per-tenant caps, an unsigned Twilio voice webhook and a media stream with
a bad stream token. A monitor polls every process's /healthz throughout.

Honest on a router that does not check tokens: it probes first (a ``start`` without a
token: closed with 4401 means tokens are enforced) and reports ``auth_enforced``; the
legitimate callers then present tokens minted with the cluster's CALLMESH_AUTH_SECRET.
Without enforcement the takeover attempts succeed, and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from callmesh.auth import mint_dev_token
from callmesh.protocol import DEFAULT_MAX_FRAME_BYTES, CloseCode
from callmesh_client.client import CallClient, CallError
from loadtest.callers import NAMES, script
from loadtest.stats import percentile, run_meta, write_report
from localcluster.cluster import LocalCluster

TENANT = "demo"
TWILIO_MEDIA, TWILIO_VOICE = "/v1/twilio/media", "/v1/twilio/voice"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("abuse", help="legitimate calls under a flood of hostile input")
    p.add_argument("--calls", type=int, default=10, help="concurrent legitimate calls")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--think", type=float, default=0.5, help="pause between turns, s")
    p.add_argument("--attackers", type=int, default=4, help="concurrent attackers per kind")
    p.add_argument("--idle", type=int, default=50, help="idle connections held open")
    p.add_argument("--excess", type=int, default=50, help="extra connections past the caps")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--latency-scale", type=float, default=0.2)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="quiet/flood phase pairs, alternating (so background load skews both alike)",
    )
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.set_defaults(func=main)


@dataclass
class Tally:
    """The flood's outcomes, by kind of attack."""

    sent: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # got what it asked for
    closes: dict[str, Counter[int]] = field(default_factory=dict)
    internal_errors: int = 0
    takeovers: int = 0

    def closed(self, kind: str, code: int | None) -> None:
        self.closes.setdefault(kind, Counter())[int(code or CloseCode.ABNORMAL)] += 1


class _TokenClient(CallClient):
    """A CallClient that presents its token in ``start`` (the browser form of auth)."""

    def __init__(self, url: str, call_id: str, token: str | None) -> None:
        super().__init__(url, call_id, timeout_s=60)
        self._token = token

    async def send(self, msg: dict[str, Any]) -> int:
        if self._token and msg.get("type") == "start":
            msg = {**msg, "token": self._token}
        return await super().send(msg)


@dataclass
class Legit:
    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    failed: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, url: str, secret: str, auth: bool, args: argparse.Namespace) -> None:
        self.url = url
        self.ws_url = url.replace("http://", "ws://")
        self.secret = secret
        self.auth = auth
        self.args = args
        self.live: dict[str, asyncio.Event] = {}  # victims, set once their call started

    def token(
        self,
        call_id: str,
        *,
        tenant: str = TENANT,
        secret: str | None = None,
        ttl_s: float = 600,
        now: float | None = None,
    ) -> str:
        return mint_dev_token(
            secret or self.secret, tenant, call_id, f"caller-{call_id}", ttl_s, now=now
        )

    # ------------------------------------------------------------------ legitimate load

    async def legit_phase(self, phase: str, legit: Legit) -> None:
        async def one(i: int) -> None:
            call_id = f"ab-{phase}-{i}"
            started = self.live.setdefault(call_id, asyncio.Event())
            token = self.token(call_id) if self.auth else None
            legit.calls += 1
            try:
                async with _TokenClient(self.url, call_id, token) as client:
                    await client.start(TENANT, f"caller-{call_id}")
                    started.set()
                    for line in script(self.args.turns):
                        reply = await client.say(line.format(name=NAMES[i % len(NAMES)]))
                        legit.latencies.append(reply.latency_ms)
                        await asyncio.sleep(self.args.think)
                    await client.hangup()
            except (CallError, OSError, TimeoutError, KeyError) as exc:
                legit.failed.append(f"{call_id}: {type(exc).__name__}: {exc}")
            finally:
                started.set()

        await asyncio.gather(*(one(i) for i in range(self.args.calls)))

    # ------------------------------------------------------------------ the flood

    async def flood(self, tally: Tally, stop: asyncio.Event, phase: str) -> None:
        async with aiohttp.ClientSession() as http:
            n = self.args.attackers
            await asyncio.gather(
                *(self._bad_tokens(http, tally, stop, a) for a in range(n)),
                *(self._takeovers(http, tally, phase, a) for a in range(self.args.calls)),
                *(self._malformed(http, tally, stop, a) for a in range(n)),
                self._idle(http, tally, stop),
                self._excess(http, tally, stop),
                *(self._twilio(http, tally, stop, a) for a in range(n)),
            )

    async def _attempt(
        self,
        http: aiohttp.ClientSession,
        tally: Tally,
        kind: str,
        call_id: str,
        start: dict[str, Any],
        headers: dict[str, str] | None = None,
        wait_s: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Connect, send ``start``, collect what comes back for ``wait_s``; hang up."""
        tally.sent[kind] += 1
        frames: list[dict[str, Any]] = []
        try:
            async with http.ws_connect(
                f"{self.ws_url}/v1/calls/{call_id}", headers=headers or {}
            ) as ws:
                await ws.send_str(json.dumps({"type": "start", "seq": 1, **start}))
                deadline = time.monotonic() + wait_s
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        msg = await ws.receive(timeout=left)
                    except TimeoutError:
                        break
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    frames.append(json.loads(msg.data))
                if not ws.closed:
                    await ws.send_str(json.dumps({"type": "hangup", "seq": 2}))
                    await ws.close()
                tally.closed(kind, ws.close_code)
        except (aiohttp.ClientError, OSError, TimeoutError):
            tally.closed(kind, None)
        if any(f.get("type") == "ready" for f in frames):
            tally.accepted[kind] += 1
        tally.internal_errors += sum(1 for f in frames if f.get("code") == "internal")
        return frames

    async def _bad_tokens(
        self, http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event, a: int
    ) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            call_id = f"bt-{a}-{i}"
            start = {"tenant": TENANT, "caller": "mallory"}
            bad = {
                "token_none": None,
                "token_expired": self.token(call_id, ttl_s=60, now=time.time() - 3600),
                "token_wrong_signature": self.token(call_id, secret=secrets.token_hex(32)),
                # A valid token of another tenant, presented for this tenant's call.
                "token_other_tenant": self.token(call_id, tenant="intruder"),
            }
            for k, (kind, token) in enumerate(bad.items()):
                headers = {"Authorization": f"Bearer {token}"} if token else None
                # A call id of its own: a hung-up call id is refused as ended, not for the token.
                target = f"{call_id}-{k}"
                await self._attempt(http, tally, kind, target, start, headers, wait_s=0.3)

    async def _takeovers(
        self, http: aiohttp.ClientSession, tally: Tally, phase: str, i: int
    ) -> None:
        """Once victim ``i`` of the flood phase is live, claim its call id: a valid token
        for it (the strongest attacker short of the client itself), no resume secret."""
        call_id = f"ab-{phase}-{i}"
        started = self.live.setdefault(call_id, asyncio.Event())
        await started.wait()
        token = self.token(call_id)
        headers = {"Authorization": f"Bearer {token}"}
        start = {"tenant": TENANT, "caller": f"caller-{call_id}", "last_seq": 0}
        frames = await self._attempt(http, tally, "takeover", call_id, start, headers)
        if any(f.get("type") != "error" for f in frames):
            tally.takeovers += 1  # the attacker heard the victim's call

    async def _malformed(
        self, http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event, a: int
    ) -> None:
        big = DEFAULT_MAX_FRAME_BYTES
        frames = [
            "{",
            "[]",
            "null",
            '"x"',
            "{}",
            '{"type":"user_text"}',
            '{"type":"user_text","seq":"1","text":"hi"}',
            f'{{"type":"user_text","seq":{2**64},"text":"hi"}}',
            '{"type":"user_text","seq":-5,"text":"hi"}',
            '{"type":"user_text","seq":1.5,"text":"hi"}',
            '{"type":"nope","seq":3}',
            '{"type":"dtmf","seq":4,"digit":["1"]}',
            '{"type":"audio","seq":5,"data":"!!not base64!!"}',
            '{"type":"mark","seq":6,"name":"²².1"}',
            '{"type":"start","seq":7,"tenant":"demo","audio":{"encoding":[],"sample_rate":{}}}',
            "[" * 5000 + "]" * 5000,
            json.dumps({"type": "user_text", "seq": 8, "text": "a" * (big + 10)}),
            json.dumps({"type": "user_text", "seq": 9, "text": "💥" * 1000, "x": {"y": [1] * 500}}),
        ]
        huge = json.dumps({"type": "audio", "seq": 10, "data": "A" * (big * 4 + 64)})
        i = 0
        while not stop.is_set():
            i += 1
            call_id = f"mf-{a}-{i}"
            token = self.token(call_id) if self.auth else None
            headers = {"Authorization": f"Bearer {token}"} if token else None
            tally.sent["malformed"] += len(frames) + 1
            try:
                async with http.ws_connect(
                    f"{self.ws_url}/v1/calls/{call_id}", headers=headers or {}
                ) as ws:
                    start = {"type": "start", "seq": 1, "tenant": TENANT, "caller": "m"}
                    await ws.send_str(json.dumps(start))
                    for raw in [*frames, huge]:
                        if ws.closed:
                            break
                        await ws.send_str(raw)
                        await asyncio.sleep(0.01)
                    while True:
                        try:
                            msg = await ws.receive(timeout=0.5)
                        except TimeoutError:
                            break
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        if json.loads(msg.data).get("code") == "internal":
                            tally.internal_errors += 1
                    tally.closed("malformed", ws.close_code)
            except (aiohttp.ClientError, OSError, TimeoutError):
                tally.closed("malformed", None)

    async def _hold(
        self,
        http: aiohttp.ClientSession,
        tally: Tally,
        kind: str,
        call_id: str,
        first: dict[str, Any] | None,
        stop: asyncio.Event,
    ) -> None:
        tally.sent[kind] += 1
        try:
            async with http.ws_connect(f"{self.ws_url}/v1/calls/{call_id}") as ws:
                if first is not None:
                    await ws.send_str(json.dumps(first))
                while not stop.is_set() and not ws.closed:
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except TimeoutError:
                        continue
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                if ws.closed:
                    tally.closed(kind, ws.close_code)
                else:
                    tally.accepted[kind] += 1  # held to the end of the flood
                    await ws.close()
        except (aiohttp.ClientError, OSError, TimeoutError):
            tally.closed(kind, None)

    async def _idle(self, http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
        await asyncio.gather(
            *(
                self._hold(http, tally, "idle", f"idle-{i}", None, stop)
                for i in range(self.args.idle)
            )
        )

    async def _excess(self, http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
        """Connections of one tenant past the caps: each starts a call and stays."""

        async def one(i: int) -> None:
            call_id = f"ex-{i}"
            start = {"type": "start", "seq": 1, "tenant": "flood", "caller": "x"}
            if self.auth:
                start["token"] = self.token(call_id, tenant="flood")
            await self._hold(http, tally, "over_cap", call_id, start, stop)

        await asyncio.gather(*(one(i) for i in range(self.args.excess)))

    async def _twilio(
        self, http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event, a: int
    ) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            tally.sent["twilio_unsigned_webhook"] += 1
            form = {"CallSid": f"CAab{a}x{i}", "From": "+15550100", "To": "+15550199"}
            async with http.post(f"{self.url}{TWILIO_VOICE}?tenant={TENANT}", data=form) as resp:
                if resp.status == 200:
                    tally.accepted["twilio_unsigned_webhook"] += 1
                tally.closed("twilio_unsigned_webhook", resp.status)
            tally.sent["twilio_bad_stream_token"] += 1
            start = {
                "event": "start",
                "streamSid": f"MZab{a}x{i}",
                "start": {
                    "callSid": f"CAab{a}x{i}",
                    "streamSid": f"MZab{a}x{i}",
                    "customParameters": {"tenant": TENANT, "token": "forged"},
                },
            }
            try:
                async with http.ws_connect(f"{self.ws_url}{TWILIO_MEDIA}") as ws:
                    await ws.send_str(json.dumps(start))
                    try:
                        msg = await ws.receive(timeout=1.0)
                        closed = msg.type is not aiohttp.WSMsgType.TEXT
                    except TimeoutError:
                        closed = False
                    if not closed:
                        tally.accepted["twilio_bad_stream_token"] += 1
                        stop_msg = {"event": "stop", "streamSid": f"MZab{a}x{i}"}
                        await ws.send_str(json.dumps(stop_msg))
                        await ws.close()
                    tally.closed("twilio_bad_stream_token", ws.close_code)
            except (aiohttp.ClientError, OSError, TimeoutError):
                tally.closed("twilio_bad_stream_token", None)


async def watch(cluster: LocalCluster, down: set[str], stop: asyncio.Event) -> None:
    """A process that exited, or failed /healthz twice running, counts as crashed."""
    misses: Counter[str] = Counter()
    procs = [p for p in [cluster.router, *cluster.nodes] if p is not None]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            for proc in procs:
                ok = proc.alive()
                if ok:
                    try:
                        async with http.get(f"{proc.url}/healthz") as resp:
                            ok = resp.status == 200
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        ok = False
                misses[proc.name] = 0 if ok else misses[proc.name] + 1
                if misses[proc.name] >= 2:
                    down.add(proc.name)
            if stop.is_set():
                return
            await asyncio.sleep(0.5)


async def probe_auth(url: str) -> bool:
    """True when the router refuses a ``start`` without a token (4401)."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{url.replace('http://', 'ws://')}/v1/calls/abuse-probe") as ws,
    ):
        await ws.send_str(json.dumps({"type": "start", "seq": 1, "tenant": TENANT}))
        msg = await ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str(json.dumps({"type": "hangup", "seq": 2}))
        await ws.close()
        return ws.close_code == CloseCode.UNAUTHORIZED


async def bench(cluster: LocalCluster, secret: str, args: argparse.Namespace) -> dict[str, Any]:
    auth = await probe_auth(cluster.router_url)
    b = Bench(cluster.router_url, secret, auth, args)
    down: set[str] = set()
    watching = asyncio.Event()
    monitor = asyncio.create_task(watch(cluster, down, watching), name="abuse-monitor")
    quiet, loud, tally = Legit(), Legit(), Tally()
    rounds: list[dict[str, float]] = []
    try:
        for n in range(args.rounds):
            q0, l0 = len(quiet.latencies), len(loud.latencies)
            await b.legit_phase(f"quiet-{n}", quiet)
            stop = asyncio.Event()
            phase = f"flood-{n}"
            flood = asyncio.create_task(b.flood(tally, stop, phase), name="abuse-flood")
            await b.legit_phase(phase, loud)
            stop.set()
            await flood
            rounds.append(
                {
                    "p99_quiet_ms": round(percentile(quiet.latencies[q0:], 99), 1),
                    "p99_flood_ms": round(percentile(loud.latencies[l0:], 99), 1),
                }
            )
    finally:
        watching.set()
        await monitor
    # Pooled over the rounds: more turns behind each p99 than one phase has.
    p99_quiet = percentile(quiet.latencies, 99)
    p99_flood = percentile(loud.latencies, 99)
    ratio = round(p99_flood / p99_quiet, 2) if p99_quiet else None
    failed = len(quiet.failed) + len(loud.failed)
    report = {
        "scenario": "abuse",
        "auth_enforced": auth,
        "bad_inputs_sent": sum(tally.sent.values()),
        "crashes": len(down),
        "crashed": sorted(down),
        "takeovers_succeeded": tally.takeovers,
        "takeover_attempts": tally.sent["takeover"],
        "legit_calls": quiet.calls + loud.calls,
        "legit_calls_failed": failed,
        "legit_failures": (quiet.failed + loud.failed)[:5],
        "internal_errors": tally.internal_errors,
        "turn_latency_p99_quiet_ms": round(p99_quiet, 1),
        "turn_latency_p99_flood_ms": round(p99_flood, 1),
        "p99_ratio": ratio,
        "legit_turns_quiet": len(quiet.latencies),
        "legit_turns_flood": len(loud.latencies),
        "rounds": rounds,
        "by_kind": {
            kind: {
                "sent": tally.sent[kind],
                "accepted": tally.accepted[kind],
                "closes": {str(k): v for k, v in sorted(tally.closes.get(kind, {}).items())},
            }
            for kind in sorted(tally.sent)
        },
    }
    errors = len(down) + tally.takeovers + failed
    report["errors"] = errors
    report["target_met"] = errors == 0 and ratio is not None and ratio <= 1.5
    return report


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.calls < 1 or args.turns < 1:
        raise SystemExit("abuse: --rounds, --calls and --turns must be >= 1")
    secret = secrets.token_hex(32)
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": str(args.latency_scale),
        "CALLMESH_LOG_LEVEL": "WARNING",
        "CALLMESH_AUTH_SECRET": secret,
        # Configured for Twilio (a public URL and an auth token) so that the unsigned voice
        # webhooks reach the signature check instead of stopping at "not configured".
        "CALLMESH_PUBLIC_URL": "https://callmesh.invalid",
        "TWILIO_AUTH_TOKEN": secrets.token_hex(16),
        # Shorter than a flood phase, so the idle connections meet the start deadline (4408).
        "CALLMESH_START_TIMEOUT_MS": "2000",
    }
    with LocalCluster(nodes=args.nodes, env=env) as cluster:
        report = asyncio.run(bench(cluster, secret, args))
    report["meta"] = run_meta()
    write_report(report, args.json_path)
    return 0 if report["crashes"] == 0 else 1
