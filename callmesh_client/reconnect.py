"""When and where a client reconnects after its router went away, I/O-free.

A router that drains closes with 4012 after a ``reconnect`` frame; one that dies just drops
the connection. Either way the call lives on its node (its checkpoint and pin are in Redis),
so the client reconnects — to the next router of its list, with jittered, bounded backoff —
and resumes with ``start`` (plus the call's resume secret), the node's ``ready.last_seq``
telling it which of its frames to send again. A refusal (authentication, limits, a bad
request) is not a lost router: reconnecting would be refused again, so the client stops.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from callmesh.protocol import CloseCode

# Close codes after which the same request would be refused again.
FINAL_CLOSE_CODES = frozenset(
    {
        CloseCode.TOO_LARGE,
        CloseCode.BAD_REQUEST,
        CloseCode.UNAUTHORIZED,
        CloseCode.FORBIDDEN,
        CloseCode.START_TIMEOUT,
        CloseCode.OVER_LIMIT,
        1008,  # policy violation
    }
)


def should_reconnect(close_code: int | None) -> bool:
    """Whether a connection that ended with ``close_code`` (None: lost) is worth another."""
    return close_code not in FINAL_CLOSE_CODES


@dataclass(frozen=True)
class ReconnectPolicy:
    """Full-jitter exponential backoff, bounded per attempt and in total."""

    first_delay_s: float = 0.05
    max_delay_s: float = 1.0
    give_up_after_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Pause before attempt ``attempt`` (0-based). The first attempt after a drain or a
        lost connection goes at once, to another router: the call is waiting."""
        if attempt == 0:
            return 0.0
        cap = min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))
        return rng.uniform(0, cap)


@dataclass
class RouterList:
    """The routers a client may use, tried in turn starting after the one that failed."""

    urls: Sequence[str]
    current: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one router URL is needed")

    @property
    def url(self) -> str:
        return self.urls[self.current]

    def advance(self) -> str:
        """The next router (the same one when there is only one, e.g. a load balancer)."""
        self.current = (self.current + 1) % len(self.urls)
        return self.url

    @property
    def rng(self) -> random.Random:
        return self._rng
