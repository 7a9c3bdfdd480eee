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
