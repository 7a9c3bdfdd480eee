"""Credentials at callmesh's trust boundary: call tokens (JWT), per-call resume secrets,
Twilio webhook signatures and stream tokens. Library only: each entry point checks what
it receives with these and turns an :class:`AuthError` into its ``refusal``."""

from callmesh.auth.claims import SCOPE_CALL, CallGrant
from callmesh.auth.errors import (
    AuthError,
    KeysUnavailable,
    Refusal,
    ResumeDenied,
    TokenBadSignature,
    TokenExpired,
    TokenForbidden,
    TokenMalformed,
    TokenUnknownKey,
    TwilioSignatureInvalid,
)
from callmesh.auth.jwks import JwksKeySource
from callmesh.auth.tokens import TokenPolicy, TokenVerifier, mint_dev_token

__all__ = [
    "SCOPE_CALL",
    "AuthError",
    "CallGrant",
    "JwksKeySource",
    "KeysUnavailable",
    "Refusal",
    "ResumeDenied",
    "TokenBadSignature",
    "TokenExpired",
    "TokenForbidden",
    "TokenMalformed",
    "TokenPolicy",
    "TokenUnknownKey",
    "TokenVerifier",
    "TwilioSignatureInvalid",
    "mint_dev_token",
]
