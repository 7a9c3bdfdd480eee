"""Authentication settings: call tokens, the router-node link secret, and the explicit
switches that turn checks off for local development.

Part of the table (:mod:`callmesh.settings.table`), kept apart for size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from callmesh.settings.kinds import ConfigError, Number, Text, Url
from callmesh.settings.model import Setting
from callmesh.settings.processes import CALL, HTTP, NODE, ROUTER, UP

_AUTH = "Authentication"
# An HS256 secret shorter than this is guessable offline from one token.
MIN_SECRET_CHARS = 32
_SECRET = Text(rf".{{{MIN_SECRET_CHARS},}}", f"{MIN_SECRET_CHARS}+ characters")
_SWITCH = Number(int, ge=0, le=1)

AUTH_SECRET_ENV = "CALLMESH_AUTH_SECRET"
LINK_SECRET_ENV = "CALLMESH_LINK_SECRET"
AUTH_DISABLED_ENV = "CALLMESH_AUTH_DISABLED"
DEV_MODE_ENV = "CALLMESH_DEV_MODE"

AUTH_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "auth_secret",
        _SECRET,
        "",
        "HS256 secret that signs call tokens (callmesh up generates one; clients of "
        "callmesh call and the load tests mint their tokens with it); also signs the "
        "Twilio stream tokens",
        (ROUTER, UP, CALL),
        _AUTH,
        env=AUTH_SECRET_ENV,
        secret=True,
    ),
    Setting(
        "auth_jwks_url",
        Url(HTTP, empty_ok=True),
        "",
        "JWKS of the identity provider whose RS256/ES256 call tokens are accepted",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_JWKS_URL",
    ),
    Setting(
        "auth_audience",
        Text(empty_ok=False),
        "callmesh",
        "the 'aud' a call token must name",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_AUDIENCE",
    ),
    Setting(
        "auth_issuer",
        Text(),
        "",
        "the 'iss' a call token must name (unset: not checked)",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_ISSUER",
    ),
    Setting(
        "auth_leeway_s",
        Number(float, ge=0, le=300),
        30.0,
        "clock skew tolerated on a token's exp/nbf/iat (s)",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_LEEWAY_S",
    ),
    Setting(
        "auth_max_lifetime_s",
        Number(float, gt=0),
        24 * 3600.0,
        "a token valid for longer than this (exp - iat) is refused (s)",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_MAX_LIFETIME_S",
    ),
    Setting(
        "auth_jwks_ttl_s",
        Number(float, gt=0),
        300.0,
        "how long a fetched JWKS is used before it is fetched again (s)",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_JWKS_TTL_S",
    ),
    Setting(
        "auth_jwks_min_refresh_s",
        Number(float, ge=0),
        30.0,
        "at most one JWKS fetch per this interval for unknown key ids (s)",
        (ROUTER,),
        _AUTH,
        env="CALLMESH_AUTH_JWKS_MIN_REFRESH_S",
    ),
    Setting(
        "link_secret",
        _SECRET,
        "",
        "shared secret of routers and nodes: authenticates the router-node link handshake "
        "and the node's detailed status (callmesh up generates one)",
        (ROUTER, NODE, UP),
        _AUTH,
        env=LINK_SECRET_ENV,
        secret=True,
    ),
    Setting(
        "auth_disabled",
        _SWITCH,
        0,
        "1: no authentication at all (no call tokens, no link handshake); for a trusted "
        "network only, and the processes say so loudly at start",
        (ROUTER, NODE),
        _AUTH,
        env=AUTH_DISABLED_ENV,
    ),
    Setting(
        "dev_mode",
        _SWITCH,
        0,
        "1: development conveniences: unsigned Twilio webhooks are accepted, a node takes "
        "single calls on /v1/node/calls/{id}",
        (ROUTER, NODE),
        _AUTH,
        env=DEV_MODE_ENV,
    ),
)


def auth_is_configured(values: Mapping[str, Any]) -> None:
    """A router checks call tokens unless told explicitly not to."""
    if values["auth_disabled"]:
        return
    if not values["auth_secret"] and not values["auth_jwks_url"]:
        raise ConfigError(
            f"the router needs {AUTH_SECRET_ENV} and/or CALLMESH_AUTH_JWKS_URL to verify call "
            f"tokens ({AUTH_DISABLED_ENV}=1 turns authentication off)"
        )
