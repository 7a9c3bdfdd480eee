"""The demo's booking as both the node and the simulated model see it: the session fact
that records a booking, and how a booking reads.

Below the providers and the prompt, so the simulated model can reason on bookings without
importing the prompt (which imports the provider interfaces).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A session fact the node sets when the model's create_booking call became an effect:
# what was booked, so the model (and the caller's next call) knows it is done.
BOOKED_FACT = "booked"


def describe_booking(details: Mapping[str, Any]) -> str | None:
    """``"cleaning for Tuesday at 3:00 pm"``: the value of the ``booked`` fact, from a
    create_booking call's arguments or from the session facts (None if incomplete)."""
    service, date, time = (details.get(k) for k in ("service", "date", "time"))
    if not (service and date and time):
        return None
    return f"{service} for {date} at {time}"


def booking_read_back(details: Mapping[str, Any]) -> str | None:
    """The words an agent says to read a booking back (``"cleaning on Tuesday at 3pm for
    Ann"``): the node books only after the caller heard exactly these and said yes
    (:mod:`conversation_node.sensitive`). None when a detail is missing."""
    service, date, time, name = (details.get(k) for k in ("service", "date", "time", "name"))
    if not all(isinstance(v, str) and v.strip() for v in (service, date, time, name)):
        return None
    return f"{service} on {date} at {time} for {name}"
