"""Call tokens: verification (the router's check before any state is touched) and
minting for development.

A token is a JWT (PyJWT) signed with HS256 and a shared secret, or with RS256/ES256 and
a key of the operator's identity provider, published as a JWKS (:mod:`callmesh.auth.jwks`).
Its claims are in :mod:`callmesh.auth.claims`. Every way a token can be wrong ends as one
of the errors of :mod:`callmesh.auth.errors`, translated from PyJWT's here, in one place.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt

from callmesh.auth.claims import SCOPE_CALL, CallGrant, grant_from_claims
from callmesh.auth.errors import (
    AuthError,
    TokenBadSignature,
    TokenExpired,
    TokenForbidden,
    TokenMalformed,
)
from callmesh.auth.jwks import ASYMMETRIC_ALGORITHMS, HS256, JwksKeySource, hs256_key

DEFAULT_AUDIENCE = "callmesh"
# A JWT with callmesh's claims is a few hundred bytes; anything this big is an attack.
MAX_TOKEN_CHARS = 8192
# Clock skew tolerated between the token's issuer and us: bounded, or "expired" would
# mean little.
MAX_LEEWAY_S = 300.0
_MAX_KID_CHARS = 256


@dataclass(frozen=True)
class TokenPolicy:
    """What a call token must satisfy besides its signature."""

    audience: str = DEFAULT_AUDIENCE
    issuer: str | None = None
    leeway_s: float = 30.0
    # A token valid for longer than this (exp - iat) is refused: long-lived bearer
    # tokens are how a leaked one stays useful.
    max_lifetime_s: float = 24 * 3600.0
    scope: str = SCOPE_CALL

    def __post_init__(self) -> None:
        if not 0 <= self.leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be within [0, {MAX_LEEWAY_S:g}]")
        if self.max_lifetime_s <= 0:
            raise ValueError("max_lifetime_s must be > 0")
        if not self.audience:
            raise ValueError("an audience is required")


@contextlib.contextmanager
def translate_jwt_errors() -> Iterator[None]:
    """PyJWT's exceptions (and whatever a hostile input makes the parser raise) as
    callmesh's refusals, grouped by cause."""
    try:
        yield
    except AuthError:
        raise
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as exc:
        raise TokenExpired(str(exc)) from exc
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
        raise TokenForbidden(str(exc)) from exc
    except jwt.MissingRequiredClaimError as exc:
        if exc.claim in ("aud", "iss"):
            raise TokenForbidden(str(exc)) from exc
        raise TokenMalformed(str(exc)) from exc
    except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError, jwt.InvalidKeyError) as exc:
        raise TokenBadSignature(str(exc)) from exc
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise TokenMalformed(f"not a valid token: {type(exc).__name__}") from exc


def unverified_header(token: object) -> tuple[str, str | None]:
    """``(alg, kid)`` of a token, after the checks that need no key."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise TokenMalformed("token missing or over the size limit")
    if not token.isascii() or token.count(".") != 2:
        raise TokenMalformed("not a compact JWS")
    with translate_jwt_errors():
        header = jwt.get_unverified_header(token)
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str):
        raise TokenMalformed("header 'alg' missing")
    if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID_CHARS):
        raise TokenMalformed("header 'kid' must be a short string")
    return alg, kid


class TokenVerifier:
    """Checks call tokens against an HS256 secret and/or a JWKS, and ``policy``.

    ``verify`` returns the token's :class:`CallGrant` or raises an :class:`AuthError`
    subclass; it never raises anything else, whatever the input."""

    def __init__(
        self,
        *,
        hs256_secret: str | bytes | None = None,
        jwks: JwksKeySource | None = None,
        policy: TokenPolicy | None = None,
    ) -> None:
        if hs256_secret is None and jwks is None:
            raise ValueError("a verifier needs an HS256 secret, a JWKS, or both")
        self._hs256 = hs256_key(hs256_secret) if hs256_secret is not None else None
        self._jwks = jwks
        self.policy = policy or TokenPolicy()

    async def _key(self, alg: str, kid: str | None) -> Any:
        if alg == HS256 and self._hs256 is not None:
            return self._hs256.key
        if alg in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            return (await self._jwks.key(kid, alg)).key
        # "none", an algorithm we never accept, or one this verifier has no key for.
        raise TokenBadSignature(f"algorithm {alg!r} is not accepted")

    async def verify(
        self,
        token: object,
        *,
        tenant: str | None = None,
        call_id: str | None = None,
        scope: str | None = None,
    ) -> CallGrant:
        """The grant of ``token``, checked to cover ``scope`` (the policy's by default)
        for ``call_id`` of ``tenant`` (None: not checked here)."""
        alg, kid = unverified_header(token)
        key = await self._key(alg, kid)
        p = self.policy
        with translate_jwt_errors():
            claims = jwt.decode(
                str(token),
                key,
                algorithms=[alg],  # the key's pinned algorithm: _key chose by it
                audience=p.audience,
                issuer=p.issuer,
                leeway=p.leeway_s,
                options={"require": ["exp", "iat", "aud"]},
            )
        grant = grant_from_claims(claims, kid)
        issued = claims.get("iat")
        if isinstance(issued, (int, float)) and grant.expires_at - issued > p.max_lifetime_s:
            raise TokenExpired("token lifetime is over the policy's maximum")
        grant.check(tenant=tenant, call_id=call_id, scope=scope or p.scope)
        return grant


def mint_dev_token(
    secret: str | bytes,
    tenant: str,
    call_id: str | None,
    caller: str,
    ttl_s: float = 3600.0,
    *,
    call_prefix: str | None = None,
    scopes: Iterable[str] = (SCOPE_CALL,),
    audience: str = DEFAULT_AUDIENCE,
    now: float | None = None,
) -> str:
    """An HS256 call token for development and load tests (``callmesh call`` mints its
    own with the development secret). Give ``call_id``, or ``call_prefix`` for a client
    that makes many calls."""
    if (call_id is None) == (call_prefix is None):
        raise ValueError("give exactly one of call_id and call_prefix")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be > 0")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "tenant": tenant,
        "sub": caller,
        "scope": " ".join(scopes),
        "aud": audience,
        "iat": issued,
        "exp": issued + int(ttl_s),
        "jti": uuid.uuid4().hex,
    }
    if call_id is not None:
        claims["call_id"] = call_id
    else:
        claims["call_prefix"] = call_prefix
    try:
        # Validated as a verifier would, so a bad claim fails here, not at the router.
        grant_from_claims(claims)
    except TokenMalformed as exc:
        raise ValueError(str(exc)) from exc
    return jwt.encode(claims, hs256_key(secret).key, algorithm=HS256)
