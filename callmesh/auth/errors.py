"""Why a credential was refused, grouped by cause, each with the refusal a client sees.

Every check in :mod:`callmesh.auth` raises one of these and nothing else, so an entry
point translates a refusal in one place: a WebSocket closes with ``refusal.close_code``
and ``refusal.reason``, an HTTP endpoint answers ``refusal.http_status``. Messages name
the cause for logs; they never quote the token or a secret.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the client is told: a WebSocket close code (RFC 6455 application range
    4000-4999, mirroring HTTP statuses as callmesh's 4400 and 4503 do), the HTTP status,
    and a short machine-readable reason (also the close reason)."""

    close_code: int
    http_status: int
    reason: str


class AuthError(Exception):
    """A credential was refused. ``retryable`` is True only when the same credential may
    succeed later (the key server was unreachable)."""

    refusal = Refusal(4401, 401, "unauthenticated")
    retryable = False


class TokenMalformed(AuthError):
    """Not a token at all: missing, oversized, not three base64url parts, not JSON, or a
    signed token that lacks a claim callmesh requires."""

    refusal = Refusal(4401, 401, "token_malformed")


class TokenExpired(AuthError):
    """Outside its validity window: past ``exp``, before ``nbf``/``iat`` (beyond the
    allowed clock skew), or valid for longer than policy allows. A client should get a
    fresh token."""

    refusal = Refusal(4401, 401, "token_expired")


class TokenBadSignature(AuthError):
    """The signature does not verify, or the token is unsigned (``alg: none``) or signed
    with an algorithm the key is not pinned to (HS/RS confusion)."""

    refusal = Refusal(4401, 401, "token_bad_signature")


class TokenUnknownKey(AuthError):
    """Signed with a key id callmesh does not know, even after refreshing the key set."""

    refusal = Refusal(4401, 401, "token_unknown_key")


class TokenForbidden(AuthError):
    """A valid token that does not grant this: another audience or issuer, a missing
    scope, another tenant, or a call id outside the token's."""

    refusal = Refusal(4403, 403, "token_forbidden")


class ResumeDenied(AuthError):
    """A reconnect without the call's current resume secret: another client, or a secret
    that was already rotated away."""

    refusal = Refusal(4403, 403, "resume_denied")


class TwilioSignatureInvalid(AuthError):
    """A webhook without a valid ``X-Twilio-Signature``."""

    refusal = Refusal(4403, 403, "twilio_signature_invalid")


class KeysUnavailable(AuthError):
    """The key set could not be fetched and none is cached: the token was not judged.
    The same token may succeed once the key server answers."""

    refusal = Refusal(4503, 503, "auth_unavailable")
    retryable = True
