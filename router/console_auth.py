"""Console tokens: short-lived HS256 JWTs that name the tenant a browser console acts for.

Development only for now: the router signs them with the development secret that
``callmesh up`` generates at start (``RouterConfig.dev_secret``) and hands them out at
``POST /console/dev-token`` (router/console.py). The shared JWT primitives (callmesh/auth/)
are meant to replace :func:`issue` and :func:`verify`; nothing else here needs to change.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

from callmesh.protocol import valid_id

ALGORITHM = "HS256"
ISSUER = "callmesh-dev"
AUDIENCE = "callmesh-console"
TOKEN_TTL_S = 15 * 60
# Tokens come from a header or a query string: anything longer is not one of ours.
MAX_TOKEN_CHARS = 2048


class ConsoleAuthError(Exception):
    """A token that is missing, malformed, expired or signed with another key."""


@dataclass(frozen=True)
class ConsoleClaims:
    tenant: str
    subject: str
    expires_at: int


def issue(secret: str, tenant: str, subject: str, ttl_s: int = TOKEN_TTL_S) -> str:
    if not (valid_id(tenant) and valid_id(subject)):
        raise ValueError("tenant and subject must match [A-Za-z0-9_-]{1,64}")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "tenant": tenant,
        "iat": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> ConsoleClaims:
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise ConsoleAuthError("missing or oversized token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise ConsoleAuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise ConsoleAuthError(f"invalid token: {type(exc).__name__}") from None
    tenant, subject = claims.get("tenant"), claims.get("sub")
    if not (valid_id(tenant) and valid_id(subject)):
        raise ConsoleAuthError("invalid token: bad tenant or subject")
    return ConsoleClaims(str(tenant), str(subject), int(claims["exp"]))
