"""Every metric: its name, type, help text and labels, declared once (the one home of the
names). :class:`callmesh.telemetry.Metrics` refuses a name not declared here; ``/metrics``
shows each with the process's prefix (``callmesh_router_``, ``callmesh_node_``,
``callmesh_effects_``), a counter with ``_total`` after its name, and the node's
``/v1/status`` without the prefix.

The names are an interface: dashboards, alerts (k8s/observability/), the Kubernetes
autoscaler (``callmesh_node_live_calls``) and the capacity benchmark read them. A value
(a fallback, an outcome, an error code) is a label, never part of a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    # The processes that export it (their /metrics shows it from start-up).
    processes: tuple[str, ...] = ()

    def exposed(self, prefix: str) -> str:
        """The family's name in the Prometheus text of a process with ``prefix``."""
        suffix = "_total" if self.kind is Kind.COUNTER else ""
        return f"{prefix}_{self.name}{suffix}"


class Process(StrEnum):
    """Each process's prefix of its metrics."""

    ROUTER = "callmesh_router"
    NODE = "callmesh_node"
    EFFECTS = "callmesh_effects"


ROUTER, NODE, EFFECTS = Process.ROUTER, Process.NODE, Process.EFFECTS

SPECS: dict[str, Spec] = {}
_processes: tuple[str, ...] = ()


def _section(*processes: str) -> None:
    """The processes exporting the metrics declared after this."""
    global _processes
    _processes = processes


def _declare(name: str, kind: Kind, help_: str, labels: tuple[str, ...]) -> str:
    if name in SPECS:
        raise ValueError(f"metric {name!r} declared twice")
    SPECS[name] = Spec(name, kind, help_, labels, _processes)
    return name


def of_process(prefix: str) -> list[Spec]:
    """The metrics a process (named by its prefix) exports."""
    return [s for s in SPECS.values() if prefix in s.processes]


def _counter(name: str, help_: str, *labels: str) -> str:
    return _declare(name, Kind.COUNTER, help_, labels)


def _gauge(name: str, help_: str, *labels: str) -> str:
    return _declare(name, Kind.GAUGE, help_, labels)


def _histogram(name: str, help_: str, *labels: str) -> str:
    return _declare(name, Kind.HISTOGRAM, help_, labels)


# ---------------------------------------------------------------- router and node
_section(ROUTER, NODE)

# The router <-> node link (callmesh.mux).
LINK_MESSAGES_SENT = _counter("link_messages_sent", "WebSocket messages sent on node links")
LINK_RECORDS_SENT = _counter("link_records_sent", "Call records sent on node links")
LINK_CHANNELS_BEHIND = _counter(
    "link_channels_behind", "Channels closed because their peer fell too far behind"
)
LINK_BAD_RECORDS = _counter("link_bad_records", "Malformed records received on node links")

# The garbage collector (callmesh.gc_tuning).
GC_PAUSE_MS = _histogram("gc_pause_ms", "Garbage collector pauses (ms)")
GC_COLLECTIONS = _counter("gc_collections", "Garbage collections, by generation", "generation")

# Health (set when /metrics is read).
_section(ROUTER, NODE, EFFECTS)
DRAINING = _gauge("draining", "1 while the process drains (not ready for new calls)")
_section(ROUTER, NODE)
REDIS_UP = _gauge("redis_up", "1 while the state store answered the last heartbeat")
_section(NODE, EFFECTS)
NATS_UP = _gauge("nats_up", "1 while the process is connected to NATS")

# ---------------------------------------------------------------- conversation node

# Calls.
_section(ROUTER, NODE)
LIVE_CALLS = _gauge("live_calls", "Live calls owned (node) or proxied (router)")
_section(NODE)
UNSAVED_CALLS = _gauge("unsaved_calls", "Live calls with state not yet checkpointed")
CALLS_STARTED = _counter("calls_started", "New calls taken")
CALLS_RESUMED = _counter("calls_resumed", "Calls resumed from a checkpoint, by reason", "reason")
CALLS_HANDED_OFF = _counter("calls_handed_off", "Calls handed off to another node (drain)")
CALLS_ENDED = _counter("calls_ended", "Calls ended by a hang-up")
# Calls ended because their client left without hanging up and did not come back in time.
CALLS_ABANDONED = _counter(
    "calls_abandoned", "Calls ended because their client left and did not come back in time"
)
FENCED_WRITES = _counter(
    "fenced_writes", "Checkpoint writes refused because a newer owner took the call"
)

# Turns.
TURNS = _counter("turns", "Turns taken (the greeting included)")
TURNS_RESPOKEN = _counter("turns_respoken", "Committed replies said again after a failover")
DECIDED_REPLIES_RESUMED = _counter(
    "decided_replies_resumed",
    "Replies of a turn in flight said from a lost owner's decided text, without the model",
)
TURNS_CUT_OFF_BEFORE_AUDIO = _counter(
    "turns_cut_off_before_audio", "Turns the caller interrupted before their first audio"
)
TURNS_OVER_BUDGET = _counter("turns_over_budget", "Turns slower than the turn budget")
TURNS_OVER_BUDGET_BY_CALLMESH = _counter(
    "turns_over_budget_by_callmesh", "Turns over budget by callmesh's own overhead"
)
TURN_LATENCY_MS = _histogram(
    "turn_latency_ms", "End of the caller's speech to the first agent audio (ms)"
)
TIME_TO_FIRST_AUDIO_MS = _histogram(
    "time_to_first_audio_ms", "Call start to the greeting's first audio (ms)"
)
TURN_STAGE_MS = _histogram(
    "turn_stage_ms", "Time of one stage of a turn on its critical path (ms)", "stage"
)
TURN_OVERHEAD_MS = _histogram(
    "turn_overhead_ms", "callmesh's own share of a turn's latency: latency minus providers (ms)"
)
INBOUND_FRAME_LAG_MS = _histogram(
    "inbound_frame_lag_ms", "How far behind the caller's clock an audio frame was handled (ms)"
)
FALLBACKS = _counter("fallbacks", "Turns that took a fallback, by kind", "kind")
GREETINGS = _counter("greetings", "Greetings of first-time callers")
GREETINGS_RETURNING = _counter("greetings_returning", "Greetings of returning callers")
BARGE_INS = _counter("barge_ins", "Agent replies the caller interrupted")
DTMF = _counter("dtmf", "Keypad digits received")

# Preemptive generation: replies started before the caller's turn was confirmed, and
# what became of them (adopted + cancelled = started, once settled); the model deltas
# the cancelled ones wrote for nothing; and the model time the adopted ones saved.
PREEMPTIVE_STARTED = _counter(
    "preemptive_started", "Replies started before the caller's turn was confirmed"
)
PREEMPTIVE_ADOPTED = _counter("preemptive_adopted", "Preemptive replies adopted by their turn")
PREEMPTIVE_CANCELLED = _counter(
    "preemptive_cancelled", "Preemptive replies cancelled (the caller went on or said other words)"
)
PREEMPTIVE_WASTED_TOKENS = _counter(
    "preemptive_wasted_tokens", "Model deltas the cancelled preemptive replies generated"
)
PREEMPTIVE_SAVED_MS_SUM = _counter(
    "preemptive_saved_ms_sum", "Model time the adopted preemptive replies saved (ms)"
)
ENDPOINT_MS_SUM = _counter(
    "endpoint_ms_sum", "Utterance-ending silences waited for, adaptive endpointing (ms)"
)
# Caller noise that started a barge-in but said nothing: the reply went on, or (cleared at
# the first sound) was resumed from the first sentence the caller had not heard.
FALSE_INTERRUPTIONS = _counter(
    "false_interruptions", "Barge-ins by caller noise that said nothing (the reply went on)"
)
REPLIES_RESUMED = _counter(
    "replies_resumed", "Replies cleared at caller noise and resumed where the caller last heard"
)

# Checkpoints and the outbox of side effects.
CHECKPOINTS = _counter("checkpoints", "Checkpoint writes that succeeded")
CHECKPOINTS_CAUGHT_UP = _counter(
    "checkpoints_caught_up", "Checkpoints written late, after the state store came back"
)
CHECKPOINT_FAILURES = _counter("checkpoint_failures", "Checkpoint writes that failed")
CHECKPOINT_WRITE_MS = _histogram("checkpoint_write_ms", "Checkpoint write (CAS) time (ms)")
OUTBOX_PUBLISHED = _counter("outbox_published", "Outbox messages JetStream acknowledged")
OUTBOX_PUBLISH_FAILURES = _counter("outbox_publish_failures", "Outbox publishes that failed")
OUTBOX_PUBLISH_MS = _histogram("outbox_publish_ms", "One outbox publish round (ms)")
# Ended calls whose final checkpoint or outbox the node's drainer still retries (gauge),
# and those it gave up on (over its bound of calls or of time; each one logged by name).
OUTBOX_DRAINING_CALLS = _gauge(
    "outbox_draining_calls", "Ended calls whose checkpoint or outbox the node still drains"
)
OUTBOX_ABANDONED_CALLS = _counter(
    "outbox_abandoned_calls", "Ended calls the node's drainer gave up on (left to the sweep)"
)

# The caller's history across calls.
HISTORY_SAVED = _counter("history_saved", "Caller histories saved at hang-up")
HISTORY_LOAD_FAILURES = _counter("history_load_failures", "Caller histories that failed to load")
HISTORY_SAVE_FAILURES = _counter("history_save_failures", "Caller histories that failed to save")

# Membership.
HEARTBEAT_FAILURES = _counter("heartbeat_failures", "Heartbeats the state store refused")
HEARTBEATS_WITHHELD = _counter(
    "heartbeats_withheld", "Heartbeats not sent because the event loop had stalled"
)

# ---------------------------------------------------------------- router
_section(ROUTER)

CALLS_ACCEPTED = _counter("calls_accepted", "Client calls accepted")
FAILOVERS = _counter("failovers", "Calls moved to a new link after theirs ended")
FAILOVER_GAP_MS = _histogram(
    "failover_gap_ms",
    "Time a call had no node: its link's end to the next link (ms; an idle call waits up to "
    "0.5 s of it on purpose, behind the calls with a turn in flight)",
)
NODE_LINKS_OPENED = _counter("node_links_opened", "Links opened to nodes")
UNACKED_AUDIO_FRAMES_DROPPED = _counter(
    "unacked_audio_frames_dropped", "Unacknowledged audio frames dropped over the replay bound"
)
REPLIES_DEDUPLICATED = _counter("replies_deduplicated", "Reply frames held as already heard")
REPLIES_CLEARED = _counter("replies_cleared", "Partial replies cleared for a new owner's")
RELINKS = _counter("relinks", "A call's links to a node that ended, by outcome", "outcome")
# Connections, calls or frames refused over a bound (router.limits: connections,
# start_timeout, tenant_calls, frame_rate, relinks...).
REFUSED = _counter("refused", "Connections, calls or frames refused over a bound", "bound")
CLIENT_ERRORS = _counter("client_errors", "Protocol errors sent to clients, by code", "code")
# Calls refused at the trust boundary, by reason (callmesh.auth.errors: token_expired,
# resume_denied...).
CALLS_REFUSED = _counter(
    "calls_refused", "Calls refused at the trust boundary, by reason", "reason"
)

# Twilio Media Streams.
TWILIO_STREAMS_ACCEPTED = _counter("twilio_streams_accepted", "Twilio streams accepted")
TWILIO_STREAMS_IDLE_CLOSED = _counter(
    "twilio_streams_idle_closed", "Twilio streams closed for sending nothing"
)
TWILIO_STREAMS_REFUSED = _counter("twilio_streams_refused", "Twilio streams refused")
TWILIO_MALFORMED_MESSAGES = _counter("twilio_malformed_messages", "Malformed Twilio messages")
TWILIO_UNKNOWN_EVENTS = _counter("twilio_unknown_events", "Twilio events of an unknown type")
TWILIO_EVENTS_OUTSIDE_STREAM = _counter(
    "twilio_events_outside_stream", "Twilio events before start or after stop"
)
TWILIO_MEDIA_OUTSIDE_STREAM = _counter(
    "twilio_media_outside_stream", "Twilio media before start or after stop"
)
TWILIO_DUPLICATE_STARTS = _counter("twilio_duplicate_starts", "Twilio start events repeated")
TWILIO_BAD_AGENT_AUDIO = _counter("twilio_bad_agent_audio", "Agent audio not sendable to Twilio")
TWILIO_FRAMES_NOT_FORWARDED = _counter(
    "twilio_frames_not_forwarded", "Agent frames a Twilio stream has no use for"
)
TWILIO_REFUSED = _counter("twilio_refused", "Twilio streams refused, by error code", "code")
TWILIO_WEBHOOK_CALLS = _counter("twilio_webhook_calls", "Twilio voice webhooks answered")
TWILIO_WEBHOOK_BAD_SIGNATURE = _counter(
    "twilio_webhook_bad_signature", "Twilio webhooks refused for their signature"
)
TWILIO_WEBHOOK_NO_TENANT = _counter(
    "twilio_webhook_no_tenant", "Twilio webhooks for a number of no tenant"
)
TWILIO_WEBHOOK_NOT_CONFIGURED = _counter(
    "twilio_webhook_not_configured", "Twilio webhooks answered 503: no public URL configured"
)
TWILIO_STREAM_SID_MISMATCH = _counter(
    "twilio_stream_sid_mismatch", "Twilio messages dropped for naming another streamSid"
)
TWILIO_ACTION_RESUMED = _counter(
    "twilio_action_resumed", "Twilio <Connect action> requests answered with a new stream"
)
TWILIO_ACTION_HANGUP = _counter(
    "twilio_action_hangup", "Twilio <Connect action> requests for a call that had ended"
)
ROUTER_DRAIN_MOVED = _counter(
    "router_drain_moved", "Callers a draining router asked to use another router"
)
ROUTER_DRAIN_REFUSED = _counter(
    "router_drain_refused", "Connections refused while the router drains"
)

# The browser console (router/console.py).
CONSOLE_CALLS_ACCEPTED = _counter("console_calls_accepted", "Calls started from the console")
CONSOLE_NODES_KILLED = _counter(
    "console_nodes_killed", "Nodes the console killed (development mode only)"
)

# ---------------------------------------------------------------- effects worker
_section(EFFECTS)

DELIVERIES = _counter(
    "deliveries",
    "Effect delivery attempts settled, by outcome (delivered, already_applied, retried, "
    "dead_lettered, rejected, malformed)",
    "outcome",
)
DEAD_LETTERS = _counter("dead_letters", "Effects moved to the dead-letter stream")
IN_FLIGHT = _gauge("in_flight", "Effects being delivered now")
