"""Console tokens: call tokens (callmesh.auth) that a browser console gets in development.

A console token is an ordinary HS256 call token (:mod:`callmesh.auth.tokens`): the tenant
and the caller, the calls it may place (``call_prefix`` ``console-``: a console makes many
calls), and its scopes: ``call``, and ``inspect`` for the call inspector. Development only
for now: the router signs them with the development secret that ``callmesh up`` generates at
start (``RouterConfig.dev_secret``) and hands them out at ``POST /console/dev-token``
(router/console.py). When the router verifies call tokens from an identity provider, the
console's API can take those through the same :class:`ConsoleTokens` interface.
"""

from __future__ import annotations

from callmesh.auth import SCOPE_CALL, CallGrant, TokenPolicy, TokenVerifier, mint_dev_token

# Read a tenant's call logs in the inspector (the console's own scope).
SCOPE_INSPECT = "inspect"
CALL_PREFIX = "console-"
TOKEN_TTL_S = 15 * 60


class ConsoleTokens:
    """Mints (development) and verifies console tokens with one HS256 secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._verifier = TokenVerifier(
            hs256_secret=secret, policy=TokenPolicy(max_lifetime_s=TOKEN_TTL_S)
        )

    def mint(self, tenant: str, caller: str) -> str:
        """A development token; ValueError for a bad tenant or caller."""
        return mint_dev_token(
            self._secret,
            tenant,
            None,
            caller,
            TOKEN_TTL_S,
            call_prefix=CALL_PREFIX,
            scopes=(SCOPE_CALL, SCOPE_INSPECT),
        )

    async def verify(self, token: str, *, scope: str, call_id: str | None = None) -> CallGrant:
        """The token's grant, checked for ``scope`` (and ``call_id``); raises
        :class:`callmesh.auth.AuthError` (its ``refusal`` says what to answer)."""
        return await self._verifier.verify(token, call_id=call_id, scope=scope)
