"""The divergence check: does the state rebuilt from the log reproduce the checkpoint?

Any divergence means the log does not explain the state the call continued from, which
is itself an incident.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


def compare(state: CallState, ckpt: Checkpoint) -> list[Divergence]:
    """Every field of the checkpoint the rebuilt state does not reproduce; facts are
    compared slot by slot so a wrong correction names its slot."""
    rebuilt = _plain(state.verified_fields())
    stored = _plain(
        {
            "turn": ckpt.turn,
            "last_seq": ckpt.last_seq,
            "status": ckpt.status,
            "working": ckpt.working,
            "facts": ckpt.facts,
        }
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
