"""The divergence check: does the state rebuilt from the log reproduce the checkpoint?

Any divergence means the log does not explain the state the call continued from, which
is itself an incident.

The log is redacted (:mod:`callmesh.redaction`) and the checkpoint is not, so both sides
are compared as the log would state them: the checkpoint's fields redacted with the same
redactor, the rebuilt ones too (a no-op for a redacted log, since redaction is
idempotent; it makes a log written before redaction verify as well). Turn, sequence and
status are compared exactly; a text or fact value is compared up to what redaction keeps
of it (the whole value in hash mode; in mask mode all but the digits a mask hides).
Nodes and replay must share the redaction settings, or every redacted value diverges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from callmesh.redaction import Redactor, default_redactor
from events.replay_state import CallState
from state_store.checkpoint import Checkpoint

# Fields of the checkpoint the log must explain exactly.
VERIFIED_FIELDS = ("turn", "last_seq", "status", "working", "facts")


@dataclass(frozen=True)
class Divergence:
    field: str
    rebuilt: Any
    checkpoint: Any


def _plain(value: Any) -> Any:
    # msgpack gives lists where to_state() gives lists too, but None/tuples/ints vs floats
    # must compare by value, not by Python type.
    return json.loads(json.dumps(value, default=str))


def compare(
    state: CallState, ckpt: Checkpoint, redactor: Redactor | None = None
) -> list[Divergence]:
    """Every field of the checkpoint the rebuilt state does not reproduce; facts are
    compared slot by slot so a wrong correction names its slot."""
    r = redactor or default_redactor()
    rebuilt = _plain(r.redact_value(state.verified_fields()))
    stored = _plain(
        r.redact_value(
            {
                "turn": ckpt.turn,
                "last_seq": ckpt.last_seq,
                "status": ckpt.status,
                "working": ckpt.working,
                "facts": ckpt.facts,
            }
        )
    )
    out = []
    for name in VERIFIED_FIELDS:
        if name == "facts":
            for slot in sorted(set(rebuilt["facts"]) | set(stored["facts"])):
                mine, theirs = rebuilt["facts"].get(slot), stored["facts"].get(slot)
                if mine != theirs:
                    out.append(Divergence(f"facts.{slot}", mine, theirs))
        elif rebuilt[name] != stored[name]:
            out.append(Divergence(name, rebuilt[name], stored[name]))
    return out
