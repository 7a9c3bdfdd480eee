"""The pieces of router failover without processes: the clients' reconnect policy, TwiML
of <Connect action> and how the simulated Twilio reads it, the action's answer from the
call's state, a resumed Twilio stream's numbering, and a draining router's refusals."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from callmesh.auth.twilio import request_signature, verify_stream_token
from callmesh.config import RouterConfig
from callmesh.protocol import CloseCode
from callmesh.telemetry import Metrics
from callmesh_client.reconnect import ReconnectPolicy, RouterList, should_reconnect
from callmesh_client.twilio_phone import _rebase, parse_twiml
from callmesh_client.voice_wire import TwilioWire
from router.app import Router
from router.twilio import TwilioLink
from router.twilio_webhook import ACTION_PATH, action_webhook, twiml
from state_store.checkpoint import Checkpoint
from state_store.errors import StoreUnavailable


def test_backoff_is_immediate_then_jittered_and_bounded() -> None:
    policy = ReconnectPolicy(first_delay_s=0.05, max_delay_s=1.0)
    rng = random.Random(1)
    assert policy.delay(0, rng) == 0.0
    delays = [policy.delay(a, rng) for a in range(1, 40)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert all(policy.delay(1, rng) <= 0.05 for _ in range(50))
    assert len(set(delays)) > 30  # jittered, not a fixed schedule


def test_refusals_are_final_lost_routers_are_not() -> None:
    for code in (None, 1000, 1001, 1006, 1011, CloseCode.ROUTER_DRAINING, CloseCode.UNAVAILABLE):
        assert should_reconnect(code), code
    for code in (CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN, CloseCode.OVER_LIMIT, 1009):
        assert not should_reconnect(code), code


def test_router_list_moves_on_and_wraps() -> None:
    routers = RouterList(["http://a", "http://b", "http://c"])
    assert [routers.advance() for _ in range(4)] == ["http://b", "http://c", "http://a", "http://b"]
    assert RouterList(["http://lb"]).advance() == "http://lb"
    with pytest.raises(ValueError):
        RouterList([])


def test_twiml_with_action_reads_back_and_hangup_is_no_stream() -> None:
    text = twiml("wss://h/v1/twilio/media", {"tenant": "t", "a": 'x"<'}, "https://h/act?tenant=t")
    connect = parse_twiml(text)
    assert connect is not None
    assert connect.stream_url == "wss://h/v1/twilio/media"
    assert connect.action == "https://h/act?tenant=t"
    assert connect.parameters == {"tenant": "t", "a": 'x"<'}
    assert parse_twiml("<Response><Hangup/></Response>") is None
    assert parse_twiml(twiml("wss://h/m", {})).action == ""  # type: ignore[union-attr]


def test_the_load_balancer_rebases_urls_on_another_router() -> None:
    assert _rebase("ws://127.0.0.1:1/v1/twilio/media", "http://127.0.0.1:2") == (
        "ws://127.0.0.1:2/v1/twilio/media"
    )
    assert _rebase("http://127.0.0.1:1/v1/twilio/action?tenant=t", "http://10.0.0.1:9") == (
        "http://10.0.0.1:9/v1/twilio/action?tenant=t"
    )


class _Store:
    def __init__(self, ckpt: Checkpoint | None = None, down: bool = False) -> None:
        self.ckpt, self.down = ckpt, down

    async def load(self, tenant: str, call_id: str) -> Checkpoint | None:
        if self.down:
            raise StoreUnavailable("redis down")
        return self.ckpt


@pytest.fixture
async def action() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def post(store: _Store, form: dict[str, str], token: str = "", sign: str = "") -> Any:
        config = RouterConfig(twilio_auth_token=token, public_url=PUBLIC, dev_mode=int(not token))
        app = web.Application()

        async def handler(request: web.Request) -> web.Response:
            return await action_webhook(request, config, Metrics("t"), store, STREAM_KEY)  # type: ignore[arg-type]

        app.router.add_post(ACTION_PATH, handler)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        url = str(server.make_url(ACTION_PATH)) + "?tenant=demo"
        # Twilio signs the public URL it requested.
        signed = f"{PUBLIC}{ACTION_PATH}?tenant=demo"
        headers = {"X-Twilio-Signature": sign(signed) if callable(sign) else sign} if token else {}
        async with aiohttp.ClientSession() as http, http.post(url, data=form, headers=headers) as r:
            return r.status, await r.text()

    yield post
    for s in servers:
        await s.close()


PUBLIC = "https://voice.example.com"
STREAM_KEY = "k" * 32
FORM = {"CallSid": "CA1", "From": "+14155550100", "CallStatus": "in-progress"}


def _ckpt(status: str) -> Checkpoint:
    return Checkpoint("demo", "CA1", "14155550100", 1, "node-1", turn=2, status=status)


async def test_action_resumes_a_live_call_and_hangs_up_an_ended_one(action: Any) -> None:
    status, text = await action(_Store(_ckpt("active")), FORM)
    assert status == 200
    connect = parse_twiml(text)
    assert connect is not None and connect.action.endswith(f"{ACTION_PATH}?tenant=demo")
    assert int(connect.parameters["seq_base"]) > 10**15  # microseconds since 1970
    # The new stream's token is a resume, bound to the call: it may take the live call over.
    grant = verify_stream_token(STREAM_KEY, connect.parameters["token"], "CA1")
    assert grant.resume and (grant.tenant, grant.caller) == ("demo", "14155550100")
    # No checkpoint yet (the stream died before the call's first one): a new stream too.
    assert parse_twiml((await action(_Store(None), FORM))[1]) is not None
    # Redis unreachable: a retry beats a wrong hang-up.
    assert parse_twiml((await action(_Store(down=True), FORM))[1]) is not None
    assert parse_twiml((await action(_Store(_ckpt("ended")), FORM))[1]) is None
    over = {**FORM, "CallStatus": "completed"}
    assert parse_twiml((await action(_Store(_ckpt("active")), over))[1]) is None
    assert (await action(_Store(None), {"From": "x"}))[0] == 400


async def test_action_requires_twilio_signature_when_configured(action: Any) -> None:
    store = _Store(_ckpt("active"))
    assert (await action(store, FORM, token="tok", sign="bad"))[0] == 403

    def good(url: str) -> str:
        return request_signature("tok", url, FORM.items())

    assert (await action(store, FORM, token="tok", sign=good))[0] == 200


def test_a_resumed_stream_numbers_its_frames_above_its_base() -> None:
    link = TwilioLink(None, Metrics("t"), 65536)  # type: ignore[arg-type]
    wire = TwilioWire("CA1", "t", "bob", {"tenant": "t", "seq_base": "1796190000000000"})
    start = link.translate(wire.opening()[1])
    assert start is not None and start.seq == 1796190000000001
    media = link.translate(wire.media("AAAA", 20))
    assert media is not None and media.seq == 1796190000000002
    # A base that is not a bounded number is ignored.
    for bad in ("-5", "1e9", "9" * 18, "x"):
        link = TwilioLink(None, Metrics("t"), 65536)  # type: ignore[arg-type]
        wire = TwilioWire("CA1", "t", "bob", {"tenant": "t", "seq_base": bad})
        assert link.translate(wire.opening()[1]).seq == 1  # type: ignore[union-attr]


def test_twilio_link_is_quiet_only_when_every_mark_came_back() -> None:
    link = TwilioLink(None, Metrics("t"), 65536)  # type: ignore[arg-type]
    assert link.quiet()
    link._marks_out = 1
    assert not link.quiet()
    wire = TwilioWire("CA1", "t", "bob")
    link.translate(wire.opening()[1])
    link.translate(wire.mark("m1"))
    assert link.quiet()


async def test_a_draining_router_refuses_new_calls_and_says_so_on_readyz() -> None:
    router = Router(RouterConfig(router_drain_s=0.5, auth_disabled=1))
    router.draining = True
    server = TestServer(router.app())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/v1/calls/c1", "/v1/twilio/media"):
                async with http.get(server.make_url(path)) as resp:
                    assert resp.status == 503
                    assert json.loads(await resp.text())["code"] == "http_503"
            async with http.post(server.make_url("/v1/twilio/voice?tenant=t"), data=FORM) as r:
                assert r.status == 503
            async with http.get(server.make_url("/readyz")) as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "draining"
            async with http.get(server.make_url("/livez")) as resp:  # alive: not restarted
                assert resp.status == 200
    finally:
        await server.close()
