"""Per-call resume secrets: proof that a reconnecting client is the call's own client.

A call's first ``start`` (with a valid token) gets a random secret in ``ready``; only its
digest is stored with the call (:class:`ResumeRecord`). A reconnect must present the
secret; it is checked in constant time and replaced by a new one (``rotate``), so a
secret seen once (a log, a proxy) cannot take the call over later, and two clients that
both hold a secret cannot both keep the call: the first to resume rotates it away from
the other.

Sans-I/O: storing the record (with a compare-and-set on ``generation``, so two racing
resumes cannot both win) belongs to the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from callmesh.auth.errors import ResumeDenied

SECRET_PREFIX = "rs1_"  # recognisable in a leak report, versioned
SECRET_BYTES = 32
MAX_SECRET_CHARS = 128


def _digest(tenant: str, call_id: str, generation: int, secret: str) -> str:
    # Bound to the call and generation: a secret (or a stored digest) of one call or of
    # an earlier generation proves nothing about another. The secret has 256 bits of
    # entropy, so a fast hash is enough (no password-style stretching needed).
    data = "\0".join(("callmesh-resume-v1", tenant, call_id, str(generation), secret))
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    """What is stored with the call: never the secret itself."""

    tenant: str
    call_id: str
    generation: int
    digest: str

    def to_state(self) -> dict[str, Any]:
        return {"generation": self.generation, "digest": self.digest}

    @classmethod
    def from_state(cls, tenant: str, call_id: str, state: dict[str, Any]) -> ResumeRecord:
        return cls(tenant, call_id, int(state["generation"]), str(state["digest"]))


def issue(tenant: str, call_id: str, generation: int = 0) -> tuple[str, ResumeRecord]:
    """A new secret (to hand to the client, once) and the record to store."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
    return secret, ResumeRecord(
        tenant, call_id, generation, _digest(tenant, call_id, generation, secret)
    )


def matches(record: ResumeRecord, presented: object) -> bool:
    """Whether ``presented`` is the record's secret (constant time in the secret)."""
    if not isinstance(presented, str) or not 0 < len(presented) <= MAX_SECRET_CHARS:
        return False
    if not presented.isascii():
        return False
    expected = _digest(record.tenant, record.call_id, record.generation, presented)
    return hmac.compare_digest(expected, record.digest)


def rotate(record: ResumeRecord, presented: object) -> tuple[str, ResumeRecord]:
    """Check ``presented`` against ``record`` and replace it: the new secret for the
    client and the next generation's record to store (compare-and-set on the old
    generation). Raises ResumeDenied when the secret is not the current one."""
    if not matches(record, presented):
        raise ResumeDenied("the resume secret is not the call's current one")
    return issue(record.tenant, record.call_id, record.generation + 1)
