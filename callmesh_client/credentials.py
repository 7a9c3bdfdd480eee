"""A client's credentials: the token it presents, minted from the development secret
when it was given none (``callmesh call``, the load tests, the cluster tests).

A real client gets its token from its operator's identity provider and passes it in;
nothing here is needed then.
"""

from __future__ import annotations

from callmesh.auth import mint_dev_token
from callmesh.auth.dev import read_dev_secret
from callmesh.auth.twilio import caller_id, mint_stream_token


def call_token(tenant: str, call_id: str, caller: str, secret: str | None = None) -> str | None:
    """A token for one call, or None when there is no secret to mint it with (a router
    with authentication disabled needs none)."""
    secret = secret or read_dev_secret()
    if not secret:
        return None
    return mint_dev_token(secret, tenant, call_id, caller, ttl_s=3600)


def stream_token(call_sid: str, tenant: str, caller: str, secret: str | None = None) -> str | None:
    """The stream token the voice webhook would put in the TwiML (a simulated Twilio)."""
    secret = secret or read_dev_secret()
    if not secret:
        return None
    # As the webhook reduces Twilio's ``From``.
    return mint_stream_token(secret, call_sid, tenant, caller_id(caller))
