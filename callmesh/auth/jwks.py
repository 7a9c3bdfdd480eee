"""Verification keys: a shared HS256 secret, or RS256/ES256 public keys from a JWKS URL.

Every key is pinned to one algorithm, and a token is checked only with a key of the
algorithm its header names: an HS256 token is never checked against a public key (the
HS/RS confusion), ``none`` is never accepted, and a JWKS may only hold RSA and EC keys
(a symmetric ``oct`` key served from a URL is skipped). Keys come from configuration
only: a token's own ``jwk``, ``jku`` or ``x5u`` header is never followed.

The key set is fetched over HTTP (aiohttp), cached for ``ttl_s`` and refreshed when a
token names a key id it does not hold, at most once per ``min_refresh_interval_s``: a
flood of tokens with made-up key ids costs the JWKS endpoint one request per interval.
When the endpoint is down the keys already held keep working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from callmesh.auth.errors import KeysUnavailable, TokenBadSignature, TokenUnknownKey
from callmesh.settings import mask_url

log = logging.getLogger(__name__)

HS256 = "HS256"
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})
_DEFAULT_ALG = {"RSA": "RS256", "EC": "ES256"}
_CURVE = {"ES256": "P-256"}
MIN_HS256_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 64 * 1024
MAX_JWKS_KEYS = 64


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    algorithm: str  # the only algorithm this key verifies
    key: Any  # a cryptography public key, or the HS256 secret as bytes


def hs256_key(secret: str | bytes, kid: str | None = None) -> VerificationKey:
    """The shared-secret key; refuses secrets too short to resist guessing."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_HS256_SECRET_BYTES:
        raise ValueError(f"an HS256 secret needs >= {MIN_HS256_SECRET_BYTES} bytes")
    return VerificationKey(kid, HS256, raw)


def parse_jwk(jwk: Any) -> VerificationKey | None:
    """A public signing key from one JWK, or None when callmesh must not use it."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    alg = jwk.get("alg") or _DEFAULT_ALG.get(str(kty))
    if alg not in ASYMMETRIC_ALGORITHMS or _DEFAULT_ALG.get(str(kty)) != alg:
        return None
    if alg in _CURVE and jwk.get("crv") != _CURVE[alg]:
        return None
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
        return None
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    if kty == "RSA" and getattr(key, "key_size", 0) < MIN_RSA_BITS:
        return None
    return VerificationKey(kid, alg, key)


def parse_jwks(body: bytes) -> list[VerificationKey]:
    """Usable keys of a JWKS document; raises ValueError when it is not one."""
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys = [parse_jwk(k) for k in doc["keys"][:MAX_JWKS_KEYS]]
    return [k for k in keys if k is not None]


class JwksKeySource:
    """Keys from ``url``, cached and refreshed as the module explains. Does not own
    ``session`` when one is given; otherwise creates one on first use and closes it in
    :meth:`aclose`."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession | None = None,
        *,
        ttl_s: float = 300.0,
        min_refresh_interval_s: float = 30.0,
        timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError("the JWKS url must be http(s)://")
        if ttl_s <= 0 or min_refresh_interval_s < 0 or timeout_s <= 0:
            raise ValueError("ttl_s and timeout_s must be > 0, min_refresh_interval_s >= 0")
        self.url = url
        self._session = session
        self._owns_session = session is None
        self._ttl_s = ttl_s
        self._min_interval_s = min_refresh_interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._keys: dict[str | None, VerificationKey] | None = None
        self._fetched_at = float("-inf")  # last successful fetch
        self._attempted_at = float("-inf")  # last fetch, successful or not
        self._lock = asyncio.Lock()
        self.fetches = 0  # requests made to the endpoint (for tests and metrics)

    async def key(self, kid: str | None, algorithm: str) -> VerificationKey:
        """The key for a token's ``kid`` and ``alg``; raises TokenUnknownKey,
        TokenBadSignature (a key pinned to another algorithm) or KeysUnavailable."""
        if self._keys is None or self._clock() - self._fetched_at >= self._ttl_s:
            await self._refresh()
        found = self._lookup(kid)
        if found is None:
            await self._refresh()
            found = self._lookup(kid)
        if found is None:
            raise TokenUnknownKey("no key with this key id")
        if found.algorithm != algorithm:
            raise TokenBadSignature(f"the key is pinned to {found.algorithm}")
        return found

    def _lookup(self, kid: str | None) -> VerificationKey | None:
        keys = self._keys or {}
        if kid is None:
            # Without a key id, only an unambiguous set will do.
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    async def _refresh(self) -> None:
        """Fetch the set unless a fetch was attempted within the minimum interval (one
        fetch at a time: concurrent callers wait for it instead of fetching again)."""
        async with self._lock:
            if self._clock() - self._attempted_at < self._min_interval_s:
                if self._keys is None:
                    raise KeysUnavailable("the key set is not available yet")
                return
            self._attempted_at = self._clock()
            self.fetches += 1
            try:
                keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.warning("JWKS fetch from %s failed: %s", mask_url(self.url), exc)
                if self._keys is None:
                    raise KeysUnavailable("the key set could not be fetched") from exc
                return
            self._keys = {k.kid: k for k in keys}
            self._fetched_at = self._clock()

    async def _fetch(self) -> list[VerificationKey]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(self.url, timeout=self._timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document too large")
        return parse_jwks(body)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await asyncio.shield(session.close())

    def __repr__(self) -> str:
        held = "none" if self._keys is None else len(self._keys)
        return f"<JwksKeySource {mask_url(self.url)} [keys: {held}, fetches: {self.fetches}]>"
