"""The console's server side against a real router app (real Redis and NATS): pages, tokens,
tenant binding of the call socket and of the inspector, what exists only in development
mode, the local cluster's kill control, and the settings that turn all this on."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from nats.js import JetStreamContext

from callmesh.auth import SCOPE_CALL, AuthError, TokenBadSignature, TokenForbidden
from callmesh.config import Backends, ConfigError, RouterConfig, build
from events import eventlog, subjects
from events.eventlog import EventType
from events.streams import ensure_streams
from localcluster.devcontrol import DevControl, new_secret
from router.app import Router
from router.console_auth import CALL_PREFIX, SCOPE_INSPECT, ConsoleTokens

pytestmark = pytest.mark.timeout(60)

SECRET = "s" * 40


def _config(redis_url: str, nats_url: str, **kw: Any) -> RouterConfig:
    auth = {"auth_secret": SECRET[::-1] + "a", "link_secret": SECRET + "l"}
    return RouterConfig(backends=Backends(redis_url=redis_url, nats_url=nats_url), **auth, **kw)


async def _serve(config: RouterConfig) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    router = Router(config)
    await router.start()
    server = TestServer(router.app())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield str(server.make_url("")).rstrip("/"), http
    finally:
        await server.close()
        await router.aclose()


@pytest.fixture
async def prod(redis_url: str, nats_url: str) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async for s in _serve(_config(redis_url, nats_url)):
        yield s


@pytest.fixture
async def dev(redis_url: str, nats_url: str) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async for s in _serve(_config(redis_url, nats_url, dev_secret=SECRET)):
        yield s


async def _token(base: str, http: aiohttp.ClientSession, tenant: str) -> str:
    async with http.post(f"{base}/console/dev-token", json={"tenant": tenant}) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        return str((await resp.json())["token"])


# ---------------------------------------------------------------- tokens and settings


async def test_console_tokens_are_call_tokens_for_console_calls() -> None:
    tokens = ConsoleTokens(SECRET)
    token = tokens.mint("acme", "ana")
    grant = await tokens.verify(token, scope=SCOPE_INSPECT)
    assert (grant.tenant, grant.caller, grant.call_prefix) == ("acme", "ana", CALL_PREFIX)
    await tokens.verify(token, scope=SCOPE_CALL, call_id=f"{CALL_PREFIX}x1")
    with pytest.raises(TokenForbidden):
        await tokens.verify(token, scope=SCOPE_CALL, call_id="someone-elses")
    with pytest.raises(TokenBadSignature):
        await ConsoleTokens("t" * 40).verify(token, scope=SCOPE_CALL)
    with pytest.raises(AuthError):
        await tokens.verify(token[:-3] + "AAA", scope=SCOPE_CALL)
    with pytest.raises(ValueError):
        tokens.mint("acme.*", "ana")


def test_development_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="CALLMESH_DEV_SECRET"):
        RouterConfig(dev_secret="short")
    with pytest.raises(ConfigError, match="needs CALLMESH_DEV_SECRET"):
        RouterConfig(dev_control_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="loopback"):
        RouterConfig(dev_secret=SECRET, dev_control_url="http://10.0.0.5:9")
    with pytest.raises(ConfigError, match="loopback"):
        build(
            RouterConfig, {"CALLMESH_DEV_SECRET": SECRET, "CALLMESH_DEV_CONTROL_URL": "http://x:1"}
        )
    env = {"CALLMESH_CONSOLE": "off", "CALLMESH_DEV_SECRET": SECRET}
    config = build(RouterConfig, env)
    assert config.console == "off" and config.dev_secret == SECRET
    assert SECRET not in repr(config)
    assert build(RouterConfig, {}).console == "on"


# ---------------------------------------------------------------- outside development mode


async def test_outside_development_mode_there_are_pages_and_no_tokens(
    prod: tuple[str, aiohttp.ClientSession],
) -> None:
    base, http = prod
    async with http.get(f"{base}/console") as resp:
        assert resp.status == 200
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert "callmesh console" in await resp.text()
    async with http.get(f"{base}/console/static/mic-worklet.js") as resp:
        assert resp.status == 200 and "javascript" in resp.headers["Content-Type"]
    async with http.get(f"{base}/console/static/secret.txt") as resp:
        assert resp.status == 404
    async with http.get(f"{base}/console/api/config") as resp:
        config = await resp.json()
        assert (config["dev"], config["kill"]) == (False, False)
    async with http.post(f"{base}/console/dev-token", json={"tenant": "demo"}) as resp:
        assert resp.status == 404
    async with http.post(f"{base}/console/api/calls/c1/kill-owner") as resp:
        assert resp.status == 404
    async with http.get(f"{base}/console/api/calls") as resp:
        assert resp.status == 401


async def test_the_console_can_be_turned_off(redis_url: str, nats_url: str) -> None:
    async for base, http in _serve(_config(redis_url, nats_url, console="off")):
        async with http.get(f"{base}/console") as resp:
            assert resp.status == 404


# ---------------------------------------------------------------- development mode


async def test_the_call_socket_is_bound_to_the_tokens_tenant(
    dev: tuple[str, aiohttp.ClientSession],
) -> None:
    base, http = dev
    ws_base = base.replace("http", "ws", 1)
    stream = f"{ws_base}/console/api/calls/{CALL_PREFIX}c1/stream"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{stream}?token=nonsense")
    assert refused.value.status == 401
    token = await _token(base, http, "acme")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{ws_base}/console/api/calls/other-c1/stream?token={token}")
    assert refused.value.status == 403  # not a call id the token covers
    for tenant, caller in (("other", "console"), ("acme", "someone")):
        async with http.ws_connect(f"{stream}?token={token}") as ws:
            start = {"type": "start", "seq": 1, "tenant": tenant, "caller": caller}
            await ws.send_str(json.dumps(start))
            error = json.loads((await ws.receive()).data)
            assert error["type"] == "error" and "another tenant or caller" in error["message"]
            closed = await ws.receive()
            assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4403


async def test_the_inspector_shows_a_tenant_its_own_calls_only(
    dev: tuple[str, aiohttp.ClientSession], js: JetStreamContext
) -> None:
    base, http = dev
    await ensure_streams(js)
    record = eventlog.record(
        EventType.CALL_STARTED, 0, seq=1, tenant="acme", caller="ana", node="node-1", epoch=1
    )
    await js.publish(subjects.call_events("acme", "seen-1"), eventlog.encode(record))
    mine = {"Authorization": f"Bearer {await _token(base, http, 'acme')}"}
    theirs = {"Authorization": f"Bearer {await _token(base, http, 'other')}"}
    async with http.get(f"{base}/console/api/calls/seen-1", headers=mine) as resp:
        assert resp.status == 200
        report = await resp.json()
    assert report["call_id"] == "seen-1" and report["final_state"]["caller"] == "ana"
    assert report["turns"][0]["records"][0]["_text"].startswith("call started on node-1")
    assert report["live"] is False and "0" in report["state_by_turn"]
    async with http.get(f"{base}/console/api/calls", headers=mine) as resp:
        rows = (await resp.json())["calls"]
    assert {"call_id": "seen-1", "messages": 1, "live": False} in rows
    async with http.get(f"{base}/console/api/calls/seen-1", headers=theirs) as resp:
        assert resp.status == 404
    async with http.get(f"{base}/console/api/calls", headers=theirs) as resp:
        assert all(c["call_id"] != "seen-1" for c in (await resp.json())["calls"])
    async with http.get(f"{base}/console/api/calls/seen-1") as resp:
        assert resp.status == 401
    async with http.get(f"{base}/console/api/calls/bad.id", headers=mine) as resp:
        assert resp.status == 400


async def test_tokens_need_a_valid_request(dev: tuple[str, aiohttp.ClientSession]) -> None:
    base, http = dev
    for body in (b"[1]", b"{not json", json.dumps({"tenant": "a b"}).encode()):
        async with http.post(f"{base}/console/dev-token", data=body) as resp:
            assert resp.status == 400
    async with http.post(f"{base}/console/dev-token", data=b"x" * 5000) as resp:
        assert resp.status == 413
    # Without the local cluster's control there is nothing to kill with.
    headers = {"Authorization": f"Bearer {await _token(base, http, 'acme')}"}
    async with http.post(
        f"{base}/console/api/calls/{CALL_PREFIX}c1/kill-owner", headers=headers
    ) as resp:
        assert resp.status == 404


# ---------------------------------------------------------------- the local cluster's control


def _post(url: str, secret: str | None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method="POST", data=b"")
    if secret is not None:
        req.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_kill_control_needs_the_secret_and_a_known_node() -> None:
    killed: list[str] = []

    def kill(node: str) -> dict[str, Any] | None:
        if node != "node-1":
            return None
        killed.append(node)
        return {"node": node, "pid": 1, "replacement": "node-3"}

    secret = new_secret()
    with DevControl(secret, kill) as control:
        assert control.url.startswith("http://127.0.0.1:")
        url = f"{control.url}/v1/dev/nodes/node-1/kill"
        assert _post(url, None)[0] == 401
        assert _post(url, "wrong")[0] == 401
        assert _post(f"{control.url}/v1/dev/other", secret)[0] == 404
        assert _post(f"{control.url}/v1/dev/nodes/node-9/kill", secret)[0] == 404
        assert killed == []
        assert _post(url, secret) == (200, {"node": "node-1", "pid": 1, "replacement": "node-3"})
        assert killed == ["node-1"]
