"""Credentials at the trust boundary (issue 15, items 1 and 2), as a library: call tokens
(HS256, and RS256/ES256 from a real local JWKS server), every refusal path and the
attacks on JWTs, per-call resume secrets, Twilio signatures and stream tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callmesh.auth import resume
from callmesh.auth.claims import SCOPE_CALL
from callmesh.auth.errors import (
    AuthError,
    KeysUnavailable,
    ResumeDenied,
    TokenBadSignature,
    TokenExpired,
    TokenForbidden,
    TokenMalformed,
    TokenUnknownKey,
    TwilioSignatureInvalid,
)
from callmesh.auth.jwks import JwksKeySource, VerificationKey, parse_jwks
from callmesh.auth.tokens import MAX_TOKEN_CHARS, TokenPolicy, TokenVerifier, mint_dev_token
from callmesh.auth.twilio import (
    mint_stream_token,
    request_signature,
    verify_json_request,
    verify_request,
    verify_stream_token,
)
from localcluster.servers import free_port

SECRET = "dev-secret-" + "x" * 32


def now() -> int:
    # Read at each use: a module-level "now" goes stale in a long test session.
    return int(time.time())


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(**over: Any) -> dict[str, Any]:
    base = {
        "tenant": "acme",
        "sub": "caller-1",
        "call_id": "call-1",
        "scope": SCOPE_CALL,
        "aud": "callmesh",
        "iat": now(),
        "exp": now() + 600,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def rs(kid: str = "rsa-1", key: Any = RSA_KEY, **over: Any) -> str:
    return jwt.encode(claims(**over), key, algorithm="RS256", headers={"kid": kid})


def es(kid: str = "ec-1", **over: Any) -> str:
    return jwt.encode(claims(**over), EC_KEY, algorithm="ES256", headers={"kid": kid})


def hs(secret: str = SECRET, **over: Any) -> str:
    return jwt.encode(claims(**over), secret, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token assembled by hand, as an attacker would (PyJWT refuses to make these)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else None
    if algo is None:
        d = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    else:
        d = json.loads(algo.to_jwk(public))
    return {**d, "kid": kid, **extra}


class JwksServer:
    """A local identity provider's JWKS endpoint; counts requests; can fail."""

    def __init__(self) -> None:
        self.keys = [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")]
        self.hits = 0
        self.status = 200
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/.well-known/jwks.json"
        self._runner: web.AppRunner | None = None

    async def _jwks(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": self.keys})

    async def __aenter__(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    async with JwksServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def jwks(idp: JwksServer, clock: FakeClock) -> AsyncIterator[JwksKeySource]:
    source = JwksKeySource(idp.url, ttl_s=300, min_refresh_interval_s=30, clock=clock)
    yield source
    await source.aclose()


@pytest.fixture
def verifier(jwks: JwksKeySource) -> TokenVerifier:
    return TokenVerifier(hs256_secret=SECRET, jwks=jwks)


# ----------------------------------------------------------------------------- accepted


async def test_hs256_dev_token_grants_its_call(verifier: TokenVerifier) -> None:
    token = mint_dev_token(SECRET, "acme", "call-7", "alice", ttl_s=60)
    grant = await verifier.verify(token, tenant="acme", call_id="call-7")
    assert (grant.tenant, grant.caller, grant.call_id, grant.call_prefix) == (
        "acme",
        "alice",
        "call-7",
        None,
    )
    assert grant.scopes == {SCOPE_CALL} and grant.expires_at > time.time()


@pytest.mark.parametrize("make", [rs, es], ids=["RS256", "ES256"])
async def test_jwks_tokens_are_verified(
    verifier: TokenVerifier, idp: JwksServer, make: Callable[..., str]
) -> None:
    grant = await verifier.verify(make(), tenant="acme", call_id="call-1")
    assert grant.tenant == "acme" and grant.key_id in ("rsa-1", "ec-1")
    # Cached: the second token costs no request.
    await verifier.verify(make(), tenant="acme", call_id="call-1")
    assert idp.hits == 1


async def test_a_call_prefix_covers_its_calls_only(verifier: TokenVerifier) -> None:
    token = mint_dev_token(SECRET, "load", None, "gen", call_prefix="lt-run1-")
    await verifier.verify(token, tenant="load", call_id="lt-run1-0042")
    with pytest.raises(TokenForbidden):
        await verifier.verify(token, tenant="load", call_id="lt-run2-0001")


async def test_clock_skew_within_the_leeway_is_tolerated(verifier: TokenVerifier) -> None:
    await verifier.verify(hs(exp=now() - 10, iat=now() - 600))
    await verifier.verify(hs(iat=now() + 10, nbf=now() + 10))


# ----------------------------------------------------------------------------- refused


async def test_expired_and_not_yet_valid_tokens(verifier: TokenVerifier) -> None:
    for token in (
        hs(exp=now() - 120, iat=now() - 600),
        rs(exp=now() - 120, iat=now() - 600),
        hs(nbf=now() + 600),
        es(iat=now() + 600, exp=now() + 1200),
    ):
        with pytest.raises(TokenExpired) as info:
            await verifier.verify(token)
        assert info.value.refusal.close_code == 4401
        assert info.value.refusal.reason == "token_expired"


async def test_a_token_valid_too_long_is_refused(verifier: TokenVerifier) -> None:
    with pytest.raises(TokenExpired):
        await verifier.verify(hs(exp=now() + 30 * 24 * 3600))


async def test_tenant_a_token_cannot_open_tenant_b_call(verifier: TokenVerifier) -> None:
    token = mint_dev_token(SECRET, "tenant-a", "call-1", "alice")
    await verifier.verify(token, tenant="tenant-a", call_id="call-1")
    with pytest.raises(TokenForbidden) as info:
        await verifier.verify(token, tenant="tenant-b", call_id="call-1")
    assert (info.value.refusal.close_code, info.value.refusal.http_status) == (4403, 403)
    with pytest.raises(TokenForbidden):
        await verifier.verify(token, tenant="tenant-a", call_id="call-2")


async def test_wrong_audience_issuer_or_scope(jwks: JwksKeySource) -> None:
    strict = TokenVerifier(hs256_secret=SECRET, jwks=jwks, policy=TokenPolicy(issuer="idp"))
    for token in (
        hs(aud="another-service", iss="idp"),
        hs(aud=None, iss="idp"),
        hs(iss="someone-else"),
        hs(iss=None),
        hs(scope="status", iss="idp"),
        rs(scope="", iss="idp"),
    ):
        with pytest.raises(TokenForbidden):
            await strict.verify(token)
    await strict.verify(hs(iss="idp"))


async def test_bad_signatures(verifier: TokenVerifier) -> None:
    for token in (
        hs(secret="another-secret-" + "y" * 32),
        rs(key=OTHER_RSA),  # the right kid, the wrong private key
        # ... and its public key embedded in the header, for a verifier naive enough
        jwt.encode(
            claims(),
            OTHER_RSA,
            algorithm="RS256",
            headers={"kid": "rsa-1", "jwk": jwk(OTHER_RSA, "rsa-1"), "jku": "http://evil/"},
        ),
        hs()[:-4] + ("AAAA" if not hs().endswith("AAAA") else "BBBB"),
    ):
        with pytest.raises(TokenBadSignature):
            await verifier.verify(token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS512", "PS256", "RS512", "EdDSA"])
async def test_unsigned_and_unaccepted_algorithms(verifier: TokenVerifier, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), lambda _: b"")
    with pytest.raises(TokenBadSignature):
        await verifier.verify(token)
    with pytest.raises(TokenBadSignature):
        await verifier.verify(token.rsplit(".", 1)[0] + ".")


async def test_hs_rs_key_confusion_is_refused(jwks: JwksKeySource, verifier: TokenVerifier) -> None:
    # The attacker signs HS256 with the identity provider's *public* key as the secret.
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = forge(
        {"alg": "HS256", "kid": "rsa-1"},
        claims(),
        lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
    )
    jwks_only = TokenVerifier(jwks=jwks)
    for v in (jwks_only, verifier):
        with pytest.raises(TokenBadSignature):
            await v.verify(token)


async def test_a_key_is_pinned_to_its_algorithm(verifier: TokenVerifier) -> None:
    # An RS256 token naming the EC key's id: never checked with a key of another kind.
    with pytest.raises(TokenBadSignature):
        await verifier.verify(rs(kid="ec-1"))


async def test_malformed_tokens(verifier: TokenVerifier) -> None:
    bad: list[object] = [
        None,
        b"bytes",
        "",
        "abc",
        "a.b.c",
        "a.b",
        "é.é.é",
        "x" * (MAX_TOKEN_CHARS + 1),
        hs(tenant=None),
        hs(sub=None),
        hs(tenant="acme.*"),
        hs(sub="+1 415 555 0100"),
        hs(call_id=None),  # neither call_id nor call_prefix
        hs(call_prefix="lt-"),  # both
        hs(scope=["call"]),
        hs(exp="tomorrow"),
        hs(exp=None),
        hs(iat=None),
        forge({"alg": "HS256", "kid": {"x": 1}}, claims(), lambda _: b"x"),
        forge({"kid": "rsa-1"}, claims(), lambda _: b"x"),
    ]
    for token in bad:
        with pytest.raises(TokenMalformed):
            await verifier.verify(token)


# ----------------------------------------------------------------------------- JWKS


async def test_unknown_key_ids_refresh_at_most_once_per_interval(
    verifier: TokenVerifier, idp: JwksServer, clock: FakeClock
) -> None:
    await verifier.verify(rs())
    assert idp.hits == 1
    with pytest.raises(TokenUnknownKey):
        await verifier.verify(rs(kid="made-up"))
    assert idp.hits == 1  # fetched just now: the interval holds for unknown ids too
    clock.now += 31
    # A flood of tokens with made-up key ids: one refresh, then refused from the cache.
    for i in range(50):
        with pytest.raises(TokenUnknownKey) as info:
            await verifier.verify(rs(kid=f"made-up-{i}"))
        assert info.value.refusal.reason == "token_unknown_key"
    assert idp.hits == 2
    # The provider rotates in a new key: known once the interval has passed.
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.keys.append(jwk(new_key, "rsa-2"))
    with pytest.raises(TokenUnknownKey):
        await verifier.verify(rs(kid="rsa-2", key=new_key))
    clock.now += 31
    assert (await verifier.verify(rs(kid="rsa-2", key=new_key))).key_id == "rsa-2"
    assert idp.hits == 3


async def test_concurrent_unknown_keys_share_one_fetch(
    verifier: TokenVerifier, idp: JwksServer
) -> None:
    results = await asyncio.gather(
        *(verifier.verify(rs(kid=f"nope-{i}")) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, TokenUnknownKey) for r in results)
    assert idp.hits == 1


async def test_jwks_outage(idp: JwksServer, clock: FakeClock) -> None:
    source = JwksKeySource(idp.url, ttl_s=60, min_refresh_interval_s=5, clock=clock)
    verifier = TokenVerifier(jwks=source)
    try:
        idp.status = 500
        with pytest.raises(KeysUnavailable) as info:
            await verifier.verify(rs())
        assert info.value.retryable and info.value.refusal.close_code == 4503
        idp.status = 200
        clock.now += 6
        await verifier.verify(rs())
        # Down again after the cache expired: the keys held keep working.
        idp.status = 503
        clock.now += 61
        await verifier.verify(es())
    finally:
        await source.aclose()


async def test_unreachable_jwks_is_unavailable_not_a_crash(clock: FakeClock) -> None:
    source = JwksKeySource(f"http://127.0.0.1:{free_port()}/jwks", timeout_s=1.0, clock=clock)
    try:
        with pytest.raises(KeysUnavailable):
            await TokenVerifier(jwks=source).verify(rs())
    finally:
        await source.aclose()


def test_only_asymmetric_signing_keys_are_taken_from_a_jwks() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    doc = {
        "keys": [
            {"kty": "oct", "k": b64(SECRET.encode()), "kid": "sym", "alg": "HS256"},
            jwk(weak, "weak"),
            jwk(p384, "p384"),
            jwk(RSA_KEY, "enc", use="enc"),
            jwk(RSA_KEY, "mislabelled", alg="ES256"),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
            jwk(RSA_KEY, "good"),
        ]
    }
    keys = parse_jwks(json.dumps(doc).encode())
    assert [(k.kid, k.algorithm) for k in keys] == [("good", "RS256")]
    with pytest.raises(ValueError):
        parse_jwks(b"[]")


async def test_a_jwks_with_a_symmetric_key_cannot_sign_hs256(
    idp: JwksServer, clock: FakeClock
) -> None:
    idp.keys = [{"kty": "oct", "k": b64(SECRET.encode()), "kid": "sym", "alg": "HS256"}]
    source = JwksKeySource(idp.url, clock=clock)
    try:
        with pytest.raises(TokenBadSignature):
            await TokenVerifier(jwks=source).verify(hs())
    finally:
        await source.aclose()


def test_policy_and_secret_bounds() -> None:
    with pytest.raises(ValueError):
        TokenPolicy(leeway_s=3600)
    with pytest.raises(ValueError):
        TokenVerifier(hs256_secret="short")
    with pytest.raises(ValueError):
        TokenVerifier()
    with pytest.raises(ValueError):
        mint_dev_token(SECRET, "acme", "call-1", "+1 415")
    with pytest.raises(ValueError):
        mint_dev_token(SECRET, "acme", None, "alice")


def test_refusals_are_documented_codes() -> None:
    table = {
        cls.__name__: (cls.refusal.close_code, cls.refusal.http_status, cls.refusal.reason)
        for cls in (
            TokenMalformed,
            TokenExpired,
            TokenBadSignature,
            TokenUnknownKey,
            TokenForbidden,
            ResumeDenied,
            TwilioSignatureInvalid,
            KeysUnavailable,
        )
    }
    assert table == {
        "TokenMalformed": (4401, 401, "token_malformed"),
        "TokenExpired": (4401, 401, "token_expired"),
        "TokenBadSignature": (4401, 401, "token_bad_signature"),
        "TokenUnknownKey": (4401, 401, "token_unknown_key"),
        "TokenForbidden": (4403, 403, "token_forbidden"),
        "ResumeDenied": (4403, 403, "resume_denied"),
        "TwilioSignatureInvalid": (4403, 403, "twilio_signature_invalid"),
        "KeysUnavailable": (4503, 503, "auth_unavailable"),
    }


# ----------------------------------------------------------------------------- fuzz


class OfflineJwks(JwksKeySource):
    """The real key source with the HTTP fetch replaced by the provider's keys."""

    async def _fetch(self) -> list[VerificationKey]:
        return parse_jwks(
            json.dumps({"keys": [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")]}).encode()
        )


def _verify_sync(verifier: TokenVerifier, token: object) -> None:
    async def run() -> None:
        await verifier.verify(token, tenant="acme", call_id="call-1")

    try:
        asyncio.run(run())
    except AuthError:
        return
    raise AssertionError(f"accepted: {token!r}")


_segment = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=60).map(b64),
    st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "tenant", "sub", "exp", "iat", "aud", "call_id"]),
        st.one_of(
            st.sampled_from(["none", "HS256", "RS256", "ES256", "rsa-1", "ec-1", "acme"]),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True),
            st.none(),
            st.lists(st.integers(), max_size=3),
        ),
        max_size=6,
    ).map(lambda d: b64(json.dumps(d).encode())),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        st.tuples(_segment, _segment, _segment).map(".".join),
        st.integers(),
        st.none(),
    )
)
def test_random_tokens_are_refused_cleanly(token: object) -> None:
    verifier = TokenVerifier(hs256_secret=SECRET, jwks=OfflineJwks("http://jwks.invalid/"))
    _verify_sync(verifier, token)


_claim_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.sampled_from(["acme", "call-1", "caller-1", "call", "callmesh", "call-"]),
    st.lists(st.sampled_from(["callmesh", "call", 1]), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            ["tenant", "sub", "call_id", "call_prefix", "scope", "aud", "iss", "exp", "iat", "nbf"]
        ),
        _claim_value,
        max_size=10,
    ),
    st.booleans(),
)
def test_validly_signed_tokens_with_random_claims_never_crash(
    fields: dict[str, Any], complete: bool
) -> None:
    # Signed with the right key: every claim check after the signature is exercised.
    payload = {**claims(), **fields} if complete else fields
    token = forge(
        {"alg": "HS256", "typ": "JWT"},
        payload,
        lambda data: hmac.new(SECRET.encode(), data, hashlib.sha256).digest(),
    )
    verifier = TokenVerifier(hs256_secret=SECRET)
    try:
        grant = asyncio.run(verifier.verify(token, tenant="acme", call_id="call-1"))
    except AuthError:
        return
    assert grant.tenant == "acme" and grant.allows_call("call-1")
    assert SCOPE_CALL in grant.scopes and grant.expires_at > time.time() - 60


# ----------------------------------------------------------------------------- resume


def test_resume_secret_rotates_on_every_reconnect() -> None:
    first, record = resume.issue("acme", "call-1")
    assert first not in json.dumps(record.to_state())  # only a digest is stored
    assert resume.matches(record, first)
    second, record2 = resume.rotate(record, first)
    assert record2.generation == 1 and second != first
    with pytest.raises(ResumeDenied):
        resume.rotate(record2, first)  # the old secret is spent
    third, _ = resume.rotate(record2, second)
    assert third not in (first, second)
    restored = resume.ResumeRecord.from_state("acme", "call-1", record2.to_state())
    assert resume.matches(restored, second)


def test_a_resume_secret_is_bound_to_its_call() -> None:
    secret, record = resume.issue("acme", "call-1")
    _, other = resume.issue("acme", "call-2")
    _, other_tenant = resume.issue("globex", "call-1")
    forged = resume.ResumeRecord("acme", "call-2", other.generation, record.digest)
    for rec in (other, other_tenant, forged):
        assert not resume.matches(rec, secret)
    for presented in (None, "", secret + "x", secret[:-1], "é" * 10, "x" * 10_000, 42):
        assert not resume.matches(record, presented)
    with pytest.raises(ResumeDenied) as info:
        resume.rotate(record, None)
    assert info.value.refusal.close_code == 4403


# ----------------------------------------------------------------------------- Twilio

DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


def test_twilio_signature_matches_twilios_published_example() -> None:
    # The example of Twilio's security documentation and its libraries' tests.
    assert request_signature("12345", DOC_URL, DOC_PARAMS.items()) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    verify_request("12345", DOC_URL, DOC_PARAMS.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_twilio_signature_refusals() -> None:
    good = request_signature("12345", DOC_URL, DOC_PARAMS.items())
    tampered = {**DOC_PARAMS, "From": "+15550000000"}
    cases: list[tuple[str, dict[str, str], object]] = [
        (DOC_URL, tampered, good),  # a parameter changed
        (DOC_URL.replace("mycompany", "evil"), DOC_PARAMS, good),  # another host
        (DOC_URL, DOC_PARAMS, None),
        (DOC_URL, DOC_PARAMS, ""),
        (DOC_URL, DOC_PARAMS, "x" * 1000),
        (DOC_URL, DOC_PARAMS, "é"),
    ]
    for url, params, sig in cases:
        with pytest.raises(TwilioSignatureInvalid) as info:
            verify_request("12345", url, params.items(), sig)
        assert info.value.refusal.http_status == 403
    with pytest.raises(TwilioSignatureInvalid):
        verify_request("another-token", DOC_URL, DOC_PARAMS.items(), good)


def test_twilio_signature_with_or_without_the_default_port() -> None:
    url = "https://voice.example.com/v1/twilio/voice?tenant=acme"
    ported = "https://voice.example.com:443/v1/twilio/voice?tenant=acme"
    sig = request_signature("tok", url, [("CallSid", "CA1")])
    verify_request("tok", ported, [("CallSid", "CA1")], sig)
    from_ported = request_signature("tok", ported, [("CallSid", "CA1")])
    verify_request("tok", url, [("CallSid", "CA1")], from_ported)
    with pytest.raises(TwilioSignatureInvalid):
        other_port = "https://voice.example.com:8443/v1/twilio/voice?tenant=acme"
        verify_request("tok", other_port, [("CallSid", "CA1")], sig)


def test_twilio_json_webhook_body_hash() -> None:
    body = b'{"CallSid": "CA1"}'
    url = f"https://voice.example.com/hook?bodySHA256={hashlib.sha256(body).hexdigest()}"
    sig = request_signature("tok", url, [])
    verify_json_request("tok", url, body, sig)
    with pytest.raises(TwilioSignatureInvalid):
        verify_json_request("tok", url, b'{"CallSid": "CA2"}', sig)


def test_stream_token_is_bound_to_its_call_sid() -> None:
    token = mint_stream_token(SECRET, "CA0123", "acme", "14155550100")
    assert len("token") + len(token) < 500  # Twilio's <Parameter> limit
    grant = verify_stream_token(SECRET, token, "CA0123")
    assert (grant.call_sid, grant.tenant, grant.caller) == ("CA0123", "acme", "14155550100")
    with pytest.raises(TokenForbidden):
        verify_stream_token(SECRET, token, "CA9999")
    for wrong_sid in ("CA0123é", None, 123, ""):
        with pytest.raises(TokenForbidden):
            verify_stream_token(SECRET, token, wrong_sid)
    with pytest.raises(TokenBadSignature):
        verify_stream_token("another-secret-" + "z" * 32, token, "CA0123")
    expired = mint_stream_token(SECRET, "CA0123", "acme", "c", ttl_s=60, now=time.time() - 300)
    with pytest.raises(TokenExpired):
        verify_stream_token(SECRET, expired, "CA0123")
    for bad in (None, "", "a.b.c", "x" * 10_000):
        with pytest.raises(TokenMalformed):
            verify_stream_token(SECRET, bad, "CA0123")


async def test_stream_and_call_tokens_are_not_interchangeable(verifier: TokenVerifier) -> None:
    stream = mint_stream_token(SECRET, "call-1", "acme", "caller-1")
    with pytest.raises(TokenForbidden):  # its audience is not callmesh's
        await verifier.verify(stream, tenant="acme", call_id="call-1")
    call = mint_dev_token(SECRET, "acme", "call-1", "caller-1")
    with pytest.raises(TokenForbidden):
        verify_stream_token(SECRET, call, "call-1")
