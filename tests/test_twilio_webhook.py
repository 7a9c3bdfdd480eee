"""Twilio's voice webhook on the real router app: TwiML that connects the call to the
media stream of the configured public URL with a stream token bound to the CallSid,
escaping, and X-Twilio-Signature checks (required outside development mode)."""

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

from callmesh.auth.twilio import request_signature, verify_stream_token
from callmesh.config import RouterConfig, build
from router.app import Router
from router.twilio_webhook import twiml

SECRET = "webhook-test-auth-secret-0123456789abcdef"
PUBLIC = "https://voice.example.com"
# A router that checks call tokens and whose public URL is configured; tests override.
BASE_CONFIG: dict[str, Any] = {
    "auth_secret": SECRET,
    "link_secret": SECRET[::-1],
    "public_url": PUBLIC,
    "twilio_auth_token": "s3cret",
}

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
        server = TestServer(Router(RouterConfig(**{**BASE_CONFIG, **config})).app())
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


def signed(url: str, form: dict[str, str] | None = None, token: str = "s3cret") -> Any:
    return {"X-Twilio-Signature": _sign(token, url, form or FORM)}


async def test_twiml_connects_the_call_with_a_stream_token_bound_to_the_call(webhook: Any) -> None:
    post, _ = await webhook()
    url = f"{PUBLIC}/v1/twilio/voice?tenant=acme"
    status, content_type, body = await post("?tenant=acme", headers=signed(url))
    assert (status, content_type) == (200, "text/xml")
    stream_url, params = stream_of(body)
    assert stream_url == "wss://voice.example.com/v1/twilio/media"
    # Tenant and caller travel only inside the signed token, bound to the CallSid.
    assert set(params) == {"token"}
    grant = verify_stream_token(SECRET, params["token"], FORM["CallSid"])
    assert (grant.tenant, grant.caller) == ("acme", "14155550100")


async def test_stream_url_comes_from_configuration_never_from_host(webhook: Any) -> None:
    post, _ = await webhook(public_url="https://voice.example.com/a&b")
    url = "https://voice.example.com/a&b/v1/twilio/voice?tenant=acme"
    headers = {**signed(url), "Host": "evil.example", "X-Forwarded-Proto": "http"}
    _, _, body = await post("?tenant=acme", headers=headers)
    assert "&amp;" in body  # escaped in the XML, intact once parsed
    assert stream_of(body)[0] == "wss://voice.example.com/a&b/v1/twilio/media"
    post, _ = await webhook(public_url="", dev_mode=1)
    status, _, body = await post("?tenant=acme", headers={"Host": "evil.example"})
    assert status == 503 and "CALLMESH_PUBLIC_URL" in body and "evil" not in body


async def test_tenant_comes_from_the_query_or_the_default_else_400(webhook: Any) -> None:
    post, _ = await webhook(twilio_auth_token="", dev_mode=1)
    status, _, body = await post()
    assert status == 400 and "tenant required" in body
    status, _, body = await post("?tenant=bad.tenant")
    assert status == 400
    post, _ = await webhook(twilio_default_tenant="dflt", twilio_auth_token="", dev_mode=1)
    _, _, body = await post(form={**FORM, "From": "client:Alice Smith"})
    grant = verify_stream_token(SECRET, stream_of(body)[1]["token"], FORM["CallSid"])
    assert (grant.tenant, grant.caller) == ("dflt", "clientAliceSmith")


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
    assert request_signature("12345", url, params.items()) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def _sign(token: str, url: str, form: dict[str, str]) -> str:
    # Independent of router code: URL, then each name+value sorted by name.
    data = url + "".join(k + form[k] for k in sorted(form))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


async def test_signature_is_required_when_a_token_is_configured(webhook: Any) -> None:
    post, _ = await webhook()
    url = f"{PUBLIC}/v1/twilio/voice?tenant=acme"
    status, _, body = await post("?tenant=acme", headers=signed(url))
    assert status == 200 and "token" in stream_of(body)[1]

    status, _, body = await post("?tenant=acme")
    assert status == 403 and "X-Twilio-Signature missing" in body
    status, _, body = await post("?tenant=acme", headers=signed(url, token="wrong"))
    assert status == 403 and "does not match" in body
    # A tampered parameter (or tenant) invalidates a signature made for the original.
    tampered = {**FORM, "From": "+1999"}
    status, _, _ = await post("?tenant=acme", form=tampered, headers=signed(url))
    assert status == 403
    status, _, _ = await post("?tenant=globex", headers=signed(url))
    assert status == 403


async def test_unsigned_webhooks_pass_only_in_development_mode(webhook: Any) -> None:
    post, _ = await webhook(twilio_auth_token="")
    status, _, body = await post("?tenant=acme")
    assert status == 403 and "TWILIO_AUTH_TOKEN" in body
    post, _ = await webhook(twilio_auth_token="", dev_mode=1)
    status, _, body = await post("?tenant=acme")
    assert status == 200 and "token" in stream_of(body)[1]


async def test_signature_over_the_public_url_with_or_without_default_port(webhook: Any) -> None:
    post, _ = await webhook()
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
