"""Event and effect errors, grouped by cause; NATS errors are translated at one boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from nats import errors as nats_errors
from nats.js import errors as js_errors


class EventsError(Exception):
    """Root of every events error."""

    retryable = False


class EventsUnavailable(EventsError):
    """NATS or JetStream could not be reached or did not answer in time."""

    retryable = True


@contextlib.contextmanager
def translate() -> Iterator[None]:
    try:
        yield
    except (
        TimeoutError,
        nats_errors.TimeoutError,
        nats_errors.NoRespondersError,
        nats_errors.ConnectionClosedError,
        nats_errors.OutboundBufferLimitError,
        js_errors.ServiceUnavailableError,
        # No stream leader answered: on a cluster, one is being elected after a server died.
        js_errors.NoStreamResponseError,
        OSError,
    ) as exc:
        raise EventsUnavailable(str(exc) or type(exc).__name__) from exc
    except (nats_errors.Error, js_errors.Error) as exc:
        raise EventsError(str(exc) or type(exc).__name__) from exc
