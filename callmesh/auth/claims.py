"""What a verified call token grants: the typed :class:`CallGrant`, and the checks of the
claims callmesh defines on top of the standard ones.

Claims of a call token (JSON, RFC 7519):

- ``tenant``: the tenant whose call this is (``[A-Za-z0-9_-]{1,64}``);
- ``sub``: the caller's identity, as customer history knows it (same alphabet);
- ``call_id`` (one call) or ``call_prefix`` (any call id starting with it: a client that
  makes many calls, such as a load generator), exactly one of the two;
- ``scope``: space-separated scopes (RFC 8693), e.g. ``"call"``;
- ``exp`` (required), ``iat`` (required), ``nbf`` (optional), ``aud``, ``iss``, ``jti``.

Tenant and caller come from here, never from what the client writes in ``start``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from callmesh.auth.errors import TokenForbidden, TokenMalformed
from callmesh.protocol import valid_id

SCOPE_CALL = "call"  # start (or resume) the calls the token names


@dataclass(frozen=True, slots=True)
class CallGrant:
    """A verified token: who may do what, for which calls, until when."""

    tenant: str
    caller: str
    call_id: str | None
    call_prefix: str | None
    scopes: frozenset[str]
    expires_at: float
    issuer: str | None = None
    token_id: str | None = None
    key_id: str | None = None

    def allows_call(self, call_id: str) -> bool:
        if self.call_id is not None:
            return call_id == self.call_id
        return self.call_prefix is not None and call_id.startswith(self.call_prefix)

    def check(self, *, tenant: str | None, call_id: str | None, scope: str) -> None:
        """Refuse (TokenForbidden) unless this grant covers ``scope`` for ``call_id`` of
        ``tenant`` (None: not asked)."""
        if scope not in self.scopes:
            raise TokenForbidden(f"token lacks scope {scope!r}")
        if tenant is not None and tenant != self.tenant:
            raise TokenForbidden("token is for another tenant")
        if call_id is not None and not self.allows_call(call_id):
            raise TokenForbidden("token does not cover this call id")


def _id_claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not valid_id(value):
        raise TokenMalformed(f"claim {name!r} missing or not [A-Za-z0-9_-]{{1,64}}")
    return value


def _optional_id(claims: Mapping[str, Any], name: str) -> str | None:
    return None if claims.get(name) is None else _id_claim(claims, name)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    raw = claims.get("scope", "")
    if not isinstance(raw, str) or len(raw) > 1024:
        raise TokenMalformed("claim 'scope' must be a space-separated string")
    return frozenset(raw.split())


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None


def grant_from_claims(claims: Mapping[str, Any], key_id: str | None = None) -> CallGrant:
    """The grant of a token whose signature and standard claims were verified."""
    tenant = _id_claim(claims, "tenant")
    caller = _id_claim(claims, "sub")
    call_id = _optional_id(claims, "call_id")
    prefix = _optional_id(claims, "call_prefix")
    if (call_id is None) == (prefix is None):
        raise TokenMalformed("a call token names exactly one of call_id and call_prefix")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise TokenMalformed("claim 'exp' must be a number")
    return CallGrant(
        tenant=tenant,
        caller=caller,
        call_id=call_id,
        call_prefix=prefix,
        scopes=_scopes(claims),
        expires_at=float(exp),
        issuer=_optional_str(claims, "iss"),
        token_id=_optional_str(claims, "jti"),
        key_id=key_id,
    )
