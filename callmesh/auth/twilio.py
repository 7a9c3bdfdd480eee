"""Twilio credentials: webhook request signatures, and the short-lived stream token.

**Signatures.** Twilio signs every webhook with ``X-Twilio-Signature``:
base64(HMAC-SHA1(auth token, URL + each POST parameter's name and value, sorted by
name)), where URL is the full URL Twilio requested, query string included. A webhook
with a JSON body is signed over the URL alone, which then carries ``bodySHA256`` (the
hex SHA-256 of the body). The URL must be the public one from configuration, never one
rebuilt from the request's ``Host``: an attacker controls that header.

**Stream token.** The TwiML that connects a call's media stream carries a token as a
``<Parameter>`` (Twilio passes it back in the stream's ``start.customParameters``): an
HS256 JWT bound to the call's ``callSid``, with its tenant and the (signature-verified)
caller, valid for a couple of minutes, with an audience of its own so it can never be
used as a call token nor a call token as a stream token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import jwt

from callmesh.auth.errors import (
    TokenBadSignature,
    TokenExpired,
    TokenForbidden,
    TokenMalformed,
    TwilioSignatureInvalid,
)
from callmesh.auth.jwks import HS256, hs256_key
from callmesh.auth.tokens import translate_jwt_errors, unverified_header
from callmesh.protocol import valid_id

SIGNATURE_HEADER = "X-Twilio-Signature"
STREAM_TOKEN_AUDIENCE = "callmesh:twilio-stream"
STREAM_TOKEN_PARAMETER = "token"
# Twilio opens the stream seconds after it fetched the TwiML.
DEFAULT_STREAM_TOKEN_TTL_S = 120.0
MAX_STREAM_TOKEN_TTL_S = 600.0
# A resume token (``<Connect action>``): Twilio opens the new stream at once, and a token
# that may take a live call over should not last.
RESUME_STREAM_TOKEN_TTL_S = 30.0
RESUME_CLAIM = "resume"
_STREAM_LEEWAY_S = 5.0
_MAX_SIGNATURE_CHARS = 64  # base64 of a SHA-1 is 28


_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_PHONE = re.compile(r"[+\d\s().-]+")
_NON_DIGITS = re.compile(r"\D")


def caller_id(value: object) -> str:
    """A caller id safe in keys and subjects, from whatever Twilio calls the caller: a
    phone number's digits (``+1 415-555-0100`` → ``14155550100``), else the id-safe
    characters (``client:alice`` → ``clientalice``)."""
    if not isinstance(value, str):
        return "anonymous"
    pattern = _NON_DIGITS if _PHONE.fullmatch(value) else _ID_CHARS
    return pattern.sub("", value)[:64] or "anonymous"


def request_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """The ``X-Twilio-Signature`` Twilio sends for a POST of form ``params`` to ``url``."""
    payload = url + "".join(name + value for name, value in sorted(params))
    mac = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def _with_and_without_default_port(url: str) -> list[str]:
    """Twilio signs the URL as it was configured; a proxy between may add or drop the
    scheme's default port, so both spellings are accepted (as Twilio's own libraries do)."""
    parts = urlsplit(url)
    default_port = {"https": 443, "http": 80}.get(parts.scheme)
    if default_port is None or parts.hostname is None:
        return [url]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port in (None, default_port):
        bare = urlunsplit(parts._replace(netloc=prefix + host))
        ported = urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default_port}"))
        return [bare, ported]
    return [url]


def _check(auth_token: str, url: str, params: list[tuple[str, str]], received: object) -> None:
    if not auth_token:
        raise ValueError("no Twilio auth token configured")
    if not isinstance(received, str) or not 0 < len(received) <= _MAX_SIGNATURE_CHARS:
        raise TwilioSignatureInvalid("X-Twilio-Signature missing")
    ok = False
    for candidate in _with_and_without_default_port(url):
        # Both are compared, so timing does not tell which spelling matched.
        expected = request_signature(auth_token, candidate, params)
        ok |= hmac.compare_digest(expected.encode(), received.encode())
    if not ok:
        raise TwilioSignatureInvalid("X-Twilio-Signature does not match")


def verify_request(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], received: object
) -> None:
    """Raise TwilioSignatureInvalid unless ``received`` signs a form POST of ``params``
    to ``url`` (the public URL from configuration, query string included)."""
    _check(auth_token, url, list(params), received)


def verify_json_request(auth_token: str, url: str, body: bytes, received: object) -> None:
    """As :func:`verify_request` for a webhook with a JSON body: the signature covers
    the URL, whose ``bodySHA256`` must be the body's hash."""
    _check(auth_token, url, [], received)
    declared = dict(parse_qsl(urlsplit(url).query)).get("bodySHA256", "")
    actual = hashlib.sha256(body).hexdigest()
    if not hmac.compare_digest(declared.encode(), actual.encode()):
        raise TwilioSignatureInvalid("bodySHA256 does not match the body")


@dataclass(frozen=True, slots=True)
class StreamGrant:
    call_sid: str
    tenant: str
    caller: str
    expires_at: float
    # Minted by the ``<Connect action>``: may take the live call over from a lost stream.
    resume: bool = False


def mint_stream_token(
    secret: str | bytes,
    call_sid: str,
    tenant: str,
    caller: str,
    ttl_s: float = DEFAULT_STREAM_TOKEN_TTL_S,
    *,
    now: float | None = None,
    resume: bool = False,
) -> str:
    """The token the voice webhook puts in the TwiML's ``<Parameter>``; ``resume`` marks
    the one of the ``<Connect action>`` (a new stream for a live call)."""
    if not all(valid_id(v) for v in (call_sid, tenant, caller)):
        raise ValueError("call_sid, tenant and caller must match [A-Za-z0-9_-]{1,64}")
    if not 0 < ttl_s <= MAX_STREAM_TOKEN_TTL_S:
        raise ValueError(f"ttl_s must be within (0, {MAX_STREAM_TOKEN_TTL_S:g}]")
    issued = int(time.time() if now is None else now)
    claims = {
        "aud": STREAM_TOKEN_AUDIENCE,
        "call_sid": call_sid,
        "tenant": tenant,
        "sub": caller,
        "iat": issued,
        "exp": issued + int(ttl_s),
    }
    if resume:
        claims[RESUME_CLAIM] = True
    return jwt.encode(claims, hs256_key(secret).key, algorithm=HS256)


def verify_stream_token(secret: str | bytes, token: object, call_sid: object) -> StreamGrant:
    """The grant of a stream token presented on the media stream's ``start`` for
    ``call_sid``; raises an AuthError (TokenForbidden for another call's token)."""
    alg, _ = unverified_header(token)
    if alg != HS256:
        raise TokenBadSignature("a stream token is HS256")
    with translate_jwt_errors():
        claims = jwt.decode(
            str(token),
            hs256_key(secret).key,
            algorithms=[HS256],
            audience=STREAM_TOKEN_AUDIENCE,
            leeway=_STREAM_LEEWAY_S,
            options={"require": ["exp", "iat", "aud"]},
        )
    fields = [claims.get(k) for k in ("call_sid", "tenant", "sub")]
    if not all(isinstance(v, str) and valid_id(v) for v in fields):
        raise TokenMalformed("stream token claims must match [A-Za-z0-9_-]{1,64}")
    if claims["exp"] - claims["iat"] > MAX_STREAM_TOKEN_TTL_S:
        raise TokenExpired("stream token lifetime is over the maximum")
    sid, tenant, caller = (str(v) for v in fields)
    # call_sid comes from the stream's start message: anything at all.
    presented = call_sid.encode(errors="replace") if isinstance(call_sid, str) else b""
    if not hmac.compare_digest(sid.encode(), presented):
        raise TokenForbidden("stream token is for another call")
    # Only the literal True: anything else is an ordinary first-stream token.
    resume = claims.get(RESUME_CLAIM) is True
    return StreamGrant(sid, tenant, caller, float(claims["exp"]), resume)
