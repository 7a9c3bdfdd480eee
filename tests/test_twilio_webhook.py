"""Twilio's voice webhook on the real router app: TwiML that connects the call to the
media stream, tenant and caller parameters, escaping, and X-Twilio-Signature checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from callmesh.config import RouterConfig, build
from router.app import Router
from router.twilio_webhook import signature, twiml

FORM = {
    "CallSid": "CA1234567890ABCDE",
    "AccountSid": "AC0000",
    "From": "+14155550100",
    "To": "+18005551212",
}
Post = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def webhook() -> AsyncIterator[Callable[..., Awaitable[tuple[Post, str]]]]:
    servers: list[TestServer] = []

    async def start(**config: Any) -> tuple[Post, str]:
        # The webhook needs no Redis: the router is not started, only its app served.
        server = TestServer(Router(RouterConfig(**config)).app())
        await server.start_server()
        servers.append(server)
        base = str(server.make_url("")).rstrip("/")

        async def post(
            query: str = "", form: dict[str, str] | None = None, headers: Any = None
        ) -> tuple[int, str, str]:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{base}/v1/twilio/voice{query}", data=form or FORM, headers=headers
                ) as resp,
            ):
                return resp.status, resp.content_type, await resp.text()

        return post, base

    yield start
    for server in servers:
        await server.close()


def stream_of(body: str) -> tuple[str, dict[str, str]]:
    stream = ET.fromstring(body).find("./Connect/Stream")
    assert stream is not None
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    return stream.attrib["url"], params


async def test_twiml_connects_the_call_to_the_media_stream(webhook: Any) -> None:
    post, base = await webhook()
    status, content_type, body = await post("?tenant=acme")
    assert (status, content_type) == (200, "text/xml")
    url, params = stream_of(body)
    assert url == base.replace("http://", "ws://") + "/v1/twilio/media"
    assert params == {"tenant": "acme", "caller": "14155550100"}


async def test_stream_url_follows_the_proxy_or_the_public_url(webhook: Any) -> None:
    post, base = await webhook()
    _, _, body = await post("?tenant=acme", headers={"X-Forwarded-Proto": "https"})
    assert stream_of(body)[0] == base.replace("http://", "wss://") + "/v1/twilio/media"
    post, _ = await webhook(public_url="https://voice.example.com/a&b")
    _, _, body = await post("?tenant=acme")
    assert "&amp;" in body  # escaped in the XML, intact once parsed
    assert stream_of(body)[0] == "wss://voice.example.com/a&b/v1/twilio/media"


async def test_tenant_comes_from_the_query_or_the_default_else_400(webhook: Any) -> None:
    post, _ = await webhook()
    status, _, body = await post()
    assert status == 400 and "tenant required" in body
    status, _, body = await post("?tenant=bad.tenant")
    assert status == 400
    post, _ = await webhook(twilio_default_tenant="dflt")
    _, _, body = await post(form={**FORM, "From": "client:Alice Smith"})
    assert stream_of(body)[1] == {"tenant": "dflt", "caller": "clientAliceSmith"}


def test_twiml_escapes_attribute_values() -> None:
    body = twiml("wss://h/x?a=1&b=2", {"k": "a<b>\"c\"&'d'"})
    assert "&lt;" in body and "&quot;" in body and "&amp;" in body
    url, params = stream_of(body)
    assert url == "wss://h/x?a=1&b=2" and params == {"k": "a<b>\"c\"&'d'"}


def test_signature_matches_twilio_documented_example() -> None:
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature("12345", url, params.items()) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def _sign(token: str, url: str, form: dict[str, str]) -> str:
    # Independent of router code: URL, then each name+value sorted by name.
    data = url + "".join(k + form[k] for k in sorted(form))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


async def test_signature_is_required_when_a_token_is_configured(webhook: Any) -> None:
    post, base = await webhook(twilio_auth_token="s3cret")
    url = f"{base}/v1/twilio/voice?tenant=acme"
    good = {"X-Twilio-Signature": _sign("s3cret", url, FORM)}
    status, _, body = await post("?tenant=acme", headers=good)
    assert status == 200 and stream_of(body)[1]["tenant"] == "acme"

    status, _, body = await post("?tenant=acme")
    assert status == 403 and "X-Twilio-Signature missing" in body
    bad = {"X-Twilio-Signature": _sign("wrong", url, FORM)}
    status, _, body = await post("?tenant=acme", headers=bad)
    assert status == 403 and "X-Twilio-Signature invalid" in body
    # A tampered parameter invalidates a signature made for the original.
    status, _, _ = await post("?tenant=acme", form={**FORM, "From": "+1999"}, headers=good)
    assert status == 403


async def test_signature_over_the_public_url_with_or_without_default_port(webhook: Any) -> None:
    post, _ = await webhook(twilio_auth_token="s3cret", public_url="https://voice.example.com")
    for url in (
        "https://voice.example.com/v1/twilio/voice?tenant=acme",
        "https://voice.example.com:443/v1/twilio/voice?tenant=acme",
    ):
        headers = {"X-Twilio-Signature": _sign("s3cret", url, FORM)}
        assert (await post("?tenant=acme", headers=headers))[0] == 200


def test_twilio_settings_come_from_the_environment() -> None:
    env = {
        "TWILIO_AUTH_TOKEN": "tok",
        "CALLMESH_PUBLIC_URL": "https://voice.example.com",
        "CALLMESH_TWILIO_TENANT": "acme",
        "CALLMESH_MAX_UNACKED_AUDIO_MS": "5000",
    }
    config = build(RouterConfig, env)
    assert config.twilio_auth_token == "tok" and "tok" not in repr(config)
    assert config.public_url == "https://voice.example.com"
    assert (config.twilio_default_tenant, config.max_unacked_audio_ms) == ("acme", 5000)
