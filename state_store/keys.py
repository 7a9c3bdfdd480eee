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


# What hang-up does to each per-call key above (state_store.store.StateStore.end): an ended
# call keeps only what replay needs (the last checkpoint: replay verifies the event log
# against it), for ``ended_call_retention_s``; everything else goes at once.
ENDED_CALL_KEPT = ("ckpt",)
ENDED_CALL_RELEASED = ("lease", "pin", "resume")


def ended_call_kept(tenant: str, call_id: str) -> list[str]:
    """Keys an ended call keeps for replay, until its retention runs out."""
    return [_call(tenant, call_id, part) for part in ENDED_CALL_KEPT]


def ended_call_released(tenant: str, call_id: str) -> list[str]:
    """Keys deleted when a call ends."""
    return [_call(tenant, call_id, part) for part in ENDED_CALL_RELEASED]


def kind_of(key: str) -> str:
    """What a key of ours is, for memory reports: a per-call part (``ckpt``, ``lease``...),
    ``caller_history``, ``tenant_calls``/``tenant_callrate``, or the key itself for the
    cluster-wide ones (``other`` for anything not ours)."""
    if key in (MEMBERS, ENDED_OUTBOX):
        return key
    parts = key.split(":")
    if len(parts) < 3 or parts[0] != PREFIX:
        return "other"
    if key.startswith(f"{PREFIX}:{{t:"):
        return f"tenant_{parts[-1]}"
    if parts[2] == "call":
        return parts[-1]
    if parts[2] == "caller":
        return "caller_history"
    return "other"


def caller_history(tenant: str, caller: str) -> str:
    """Long-term memory of one caller of one tenant (list of msgpack call summaries)."""
    return f"{PREFIX}:{tenant}:caller:{{{caller}}}:history"


def resume(tenant: str, call_id: str) -> str:
    """Hash {generation, digest}: the digest of the live call's current resume secret
    (callmesh.auth.resume); a reconnect must present the secret."""
    return _call(tenant, call_id, "resume")


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
