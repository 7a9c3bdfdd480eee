"""The router's trust boundary for calls: who is calling, and may they take this call.

Built from :class:`~callmesh.config.RouterConfig` (``callmesh.settings.auth_table``):

- :meth:`CallAuth.grant` checks a native call's token (``Authorization: Bearer`` on the
  upgrade, or ``start.token``) before any state is touched; the grant names the tenant,
  the caller and the calls the token covers;
- :meth:`CallAuth.admit` then claims the call's resume record in Redis: a call with no
  live record gets a fresh secret; a live call (a takeover or a reconnect) only for the
  client presenting its current secret, which is rotated (compare-and-set), so the
  secret handed out in ``ready`` is always the newest;
- :meth:`CallAuth.stream_key` signs and checks Twilio stream tokens.

Every refusal is an :class:`~callmesh.auth.AuthError`, whose ``refusal`` the entry point
turns into a close code. With ``auth_disabled`` the checks are skipped (and said so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp

from callmesh.auth import (
    AuthError,
    CallGrant,
    JwksKeySource,
    ResumeDenied,
    TokenForbidden,
    TokenMalformed,
    TokenPolicy,
    TokenVerifier,
)
from callmesh.auth import resume as resume_secrets
from callmesh.auth.resume import ResumeRecord
from callmesh.config import ConfigError, RouterConfig
from callmesh.protocol import TAKES_DECIDED, Inbound, encode
from callmesh.settings.auth_table import auth_is_configured
from state_store.resume import ResumeStore

log = logging.getLogger("callmesh.router.auth")

BEARER = "bearer "
# Fields of ``start`` that are credentials: checked here, never forwarded to a node (the
# node records its start in the event log).
CREDENTIAL_FIELDS = ("token", "resume")
# Fields of a node's ``start`` that only a router may write: a ``decided`` reply is said as
# the agent's own words, so one claimed by a client is dropped at the edge.
ROUTER_ONLY_FIELDS = ("decided", TAKES_DECIDED)


@dataclass(frozen=True, slots=True)
class Admission:
    """A call the client may drive: its identity and the secret for its ``ready``."""

    tenant: str
    caller: str
    secret: str | None
    record: ResumeRecord | None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None without one."""
    if not header:
        return None
    if header[: len(BEARER)].lower() != BEARER:
        raise TokenMalformed("Authorization must be 'Bearer <token>'")
    return header[len(BEARER) :].strip()


class CallAuth:
    """Token verification and resume records for one router."""

    def __init__(self, config: RouterConfig) -> None:
        auth_is_configured(
            {
                "auth_disabled": config.auth_disabled,
                "auth_secret": config.auth_secret,
                "auth_jwks_url": config.auth_jwks_url,
            }
        )
        self.disabled = bool(config.auth_disabled)
        self._config = config
        self._jwks: JwksKeySource | None = None
        self._verifier: TokenVerifier | None = None
        self._resume: ResumeStore | None = None
        # Stream tokens: the call-token secret if there is one, else the link secret
        # (audiences keep the kinds of token apart either way).
        self.stream_key: str | None = config.auth_secret or config.link_secret or None

    def start(self, http: aiohttp.ClientSession, resume: ResumeStore) -> None:
        cfg = self._config
        self._resume = resume
        if self.disabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (CALLMESH_AUTH_DISABLED=1): anyone who reaches "
                "this router can start, join or take over any tenant's call"
            )
            return
        if cfg.auth_jwks_url:
            self._jwks = JwksKeySource(
                cfg.auth_jwks_url,
                http,
                ttl_s=cfg.auth_jwks_ttl_s,
                min_refresh_interval_s=cfg.auth_jwks_min_refresh_s,
            )
        try:
            self._verifier = TokenVerifier(
                hs256_secret=cfg.auth_secret or None,
                jwks=self._jwks,
                policy=TokenPolicy(
                    audience=cfg.auth_audience,
                    issuer=cfg.auth_issuer or None,
                    leeway_s=cfg.auth_leeway_s,
                    max_lifetime_s=cfg.auth_max_lifetime_s,
                ),
            )
        except ValueError as exc:
            raise ConfigError(f"call token verification: {exc}") from None

    async def aclose(self) -> None:
        if self._jwks is not None:
            await self._jwks.aclose()

    async def grant(self, token: str | None, call_id: str) -> CallGrant | None:
        """The grant of ``token`` for ``call_id`` (None with authentication disabled)."""
        if self.disabled:
            return None
        if self._verifier is None:
            raise RuntimeError("CallAuth not started")
        if token is None:
            raise TokenMalformed("no token: send 'Authorization: Bearer' or start.token")
        return await self._verifier.verify(token, call_id=call_id)

    async def admit(
        self,
        grant: CallGrant | None,
        start: Inbound,
        call_id: str,
        *,
        resumable: bool = True,
        proven: bool = False,
    ) -> Admission:
        """Check ``start`` against the grant and claim the call's resume record. A call
        that is already live needs the current secret (``start.resume``); with
        ``resumable`` False (a Twilio stream whose token is not a resume) it is refused;
        with ``proven`` (a Twilio stream with the ``<Connect action>``'s resume token, which
        has no secret to present) the link's credentials are the proof, and the record
        is rotated all the same."""
        body = start.body
        tenant, caller = str(body["tenant"]), str(body.get("caller", "anonymous"))
        if self.disabled:
            return Admission(tenant, caller, None, None)
        if grant is None and resumable and not proven:
            # (A Twilio stream's identity is its stream token, checked by its link.)
            raise TokenMalformed("a native call needs a token")
        if grant is not None:
            # The token decides; a start that claims someone else is refused, not fixed.
            if tenant != grant.tenant:
                raise TokenForbidden("start.tenant is not the token's tenant")
            if "caller" in body and caller != grant.caller:
                raise TokenForbidden("start.caller is not the token's caller")
            tenant, caller = grant.tenant, grant.caller
        if self._resume is None:
            raise RuntimeError("CallAuth not started")
        current = await self._resume.get(tenant, call_id)
        if current is None:
            secret, record = resume_secrets.issue(tenant, call_id)
        elif not resumable:
            raise ResumeDenied("the call is already live")
        elif proven:
            secret, record = resume_secrets.issue(tenant, call_id, current.generation + 1)
        else:
            secret, record = resume_secrets.rotate(current, body.get("resume"))
        if not await self._resume.swap(current, record):
            raise ResumeDenied("another connection claimed the call first")
        return Admission(tenant, caller, secret, record)

    async def release(self, admission: Admission) -> None:
        """The call ended: its resume record goes (unless a newer connection rotated it)."""
        if self._resume is not None and admission.record is not None:
            await self._resume.delete(admission.record)


def sanitized_start(start: Inbound, tenant: str, caller: str) -> Inbound:
    """``start`` as the node sees it: the verified tenant and caller, no credentials,
    nothing a client claims that only a router may say, and what this router takes."""
    body = {
        k: v
        for k, v in start.body.items()
        if k not in CREDENTIAL_FIELDS and k not in ROUTER_ONLY_FIELDS
    }
    body["tenant"], body["caller"] = tenant, caller
    body[TAKES_DECIDED] = True  # this router keeps a node's decided replies (router.upstream)
    return Inbound(start.type, start.seq, body, encode(body))


__all__ = ["Admission", "AuthError", "CallAuth", "bearer_token", "sanitized_start"]
