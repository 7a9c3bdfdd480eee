"""Every Redis key callmesh uses, in one place.

Keys of one call share the hash tag ``{call_id}`` (a tenant's quota keys the tag
``{t:tenant}``) so multi-key Lua scripts work on Redis Cluster, and every call key starts
with the tenant so one tenant's keys can never be named from another's (architecture
invariants 8 and 9). Callers pass identifiers that :func:`callmesh.protocol.valid_id`
accepted; the key functions do not re-validate.
"""

from __future__ import annotations

PREFIX = "cm"

# Cluster-wide membership: hash of node_id → msgpack node record (one key, one slot).
MEMBERS = f"{PREFIX}:members"

# Ended calls whose checkpoint outbox may still hold unpublished effects: sorted set of
# :func:`ended_outbox_member` → ms its drainer last tried (one key, one slot).
ENDED_OUTBOX = f"{PREFIX}:ended-outbox"


def ended_outbox_member(tenant: str, call_id: str) -> str:
    """``tenant/call_id`` (ids never contain ``/``): a member names its tenant."""
    return f"{tenant}/{call_id}"


def _call(tenant: str, call_id: str, part: str) -> str:
    return f"{PREFIX}:{tenant}:call:{{{call_id}}}:{part}"


def lease(tenant: str, call_id: str) -> str:
    """Hash {epoch, node}: who owns the call, and the fencing epoch of that ownership."""
    return _call(tenant, call_id, "lease")


def checkpoint(tenant: str, call_id: str) -> str:
    """msgpack blob of the call's compressed state, written only by the current epoch."""
    return _call(tenant, call_id, "ckpt")


def pin(tenant: str, call_id: str) -> str:
    """The node a router pinned the call to; lets any router find a live call's owner."""
    return _call(tenant, call_id, "pin")


def caller_history(tenant: str, caller: str) -> str:
    """Long-term memory of one caller of one tenant (list of msgpack call summaries)."""
    return f"{PREFIX}:{tenant}:caller:{{{caller}}}:history"


# Per-tenant keys carry the tenant as their own hash tag: a tenant's quota keys share one
# slot on Redis Cluster (the quota script touches both), apart from any call's keys.
def _tenant(tenant: str, part: str) -> str:
    return f"{PREFIX}:{{t:{tenant}}}:{part}"


def tenant_calls(tenant: str) -> str:
    """Sorted set of the tenant's live calls (member: call id, score: lease expiry in ms),
    shared by every router: the concurrent-calls quota."""
    return _tenant(tenant, "calls")


def tenant_call_rate(tenant: str) -> str:
    """Counter of the tenant's new calls in the current second: the call-rate quota."""
    return _tenant(tenant, "callrate")
