"""Every metric's name, grouped by the process that records it: the one home of the names
(``callmesh.telemetry.Metrics`` records them; ``/metrics`` shows them with the process's
prefix, ``callmesh_router_`` or ``callmesh_node_``, and the node's ``/v1/status`` without).

The names are an interface: dashboards, alerts and the capacity benchmark read them. A
name built from a value (an error code, a fallback) is a function here, so the spelling
of the family stays in this module.
"""

from __future__ import annotations

# ---------------------------------------------------------------- both processes

# The router <-> node link (callmesh.mux): counters.
LINK_MESSAGES_SENT = "link_messages_sent"
LINK_RECORDS_SENT = "link_records_sent"
LINK_CHANNELS_BEHIND = "link_channels_behind"
LINK_BAD_RECORDS = "link_bad_records"

# The garbage collector (callmesh.gc_tuning).
GC_PAUSE_MS = "gc_pause_ms"  # histogram


def gc_collections(generation: int) -> str:
    """Counter of the collections of one generation."""
    return f"gc_collections_gen{generation}"


# ---------------------------------------------------------------- conversation node

# Calls (gauges: LIVE_CALLS, UNSAVED_CALLS, set when /metrics is read).
LIVE_CALLS = "live_calls"  # the router has one of the same name: its live calls
UNSAVED_CALLS = "unsaved_calls"
CALLS_STARTED = "calls_started"
CALLS_RESUMED = "calls_resumed"
CALLS_HANDED_OFF = "calls_handed_off"
CALLS_ENDED = "calls_ended"
# Calls ended because their client left without hanging up and did not come back in time.
CALLS_ABANDONED = "calls_abandoned"
FENCED_OUT = "fenced_out"

# Turns.
TURNS = "turns"
TURNS_RESPOKEN = "turns_respoken"
TURNS_CUT_OFF_BEFORE_AUDIO = "turns_cut_off_before_audio"
TURNS_OVER_BUDGET = "turns_over_budget"
TURNS_OVER_BUDGET_BY_CALLMESH = "turns_over_budget_by_callmesh"
TURN_LATENCY_MS_SUM = "turn_latency_ms_sum"
TURN_OVERHEAD_MS_SUM = "turn_overhead_ms_sum"
TURN_RETRIEVAL_MS_SUM = "turn_retrieval_ms_sum"
TURN_OVERHEAD_MS = "turn_overhead_ms"  # histogram
INBOUND_FRAME_LAG_MS = "inbound_frame_lag_ms"  # histogram
GREETINGS = "greetings"
GREETINGS_RETURNING = "greetings_returning"
BARGE_INS = "barge_ins"
DTMF = "dtmf"
# Preemptive generation: replies started before the caller's turn was confirmed, and
# what became of them (adopted + cancelled = started, once settled); the model deltas
# the cancelled ones wrote for nothing; and the model time the adopted ones saved.
PREEMPTIVE_STARTED = "preemptive_started"
PREEMPTIVE_ADOPTED = "preemptive_adopted"
PREEMPTIVE_CANCELLED = "preemptive_cancelled"
PREEMPTIVE_WASTED_TOKENS = "preemptive_wasted_tokens"
PREEMPTIVE_SAVED_MS_SUM = "preemptive_saved_ms_sum"
ENDPOINT_MS_SUM = "endpoint_ms_sum"  # the utterance-ending silences used (adaptive)
# Caller noise that started a barge-in but said nothing: the reply went on.
FALSE_INTERRUPTIONS = "false_interruptions"


def fallback(name: str) -> str:
    """Counter of the turns that took one fallback (``llm_timeout``, ``tts_failed``...)."""
    return f"fallback_{name}"


# Checkpoints and the outbox of side effects.
CHECKPOINTS = "checkpoints"
CHECKPOINTS_CAUGHT_UP = "checkpoints_caught_up"
CHECKPOINT_FAILURES = "checkpoint_failures"
OUTBOX_PUBLISHED = "outbox_published"
OUTBOX_PUBLISH_FAILURES = "outbox_publish_failures"
# Ended calls whose final checkpoint or outbox the node's drainer still retries (gauge),
# and those it gave up on (over its bound of calls or of time; each one logged by name).
OUTBOX_DRAINING_CALLS = "outbox_draining_calls"
OUTBOX_ABANDONED_CALLS = "outbox_abandoned_calls"

# The caller's history across calls.
HISTORY_SAVED = "history_saved"
HISTORY_LOAD_FAILURES = "history_load_failures"
HISTORY_SAVE_FAILURES = "history_save_failures"

# Membership.
REDIS_UP = "redis_up"  # gauge
HEARTBEAT_FAILURES = "heartbeat_failures"

# ---------------------------------------------------------------- router

# Calls and failover (LIVE_CALLS above is also the router's gauge of its live calls).
CALLS_ACCEPTED = "calls_accepted"
FAILOVERS = "failovers"
FAILOVER_GAP_MS_SUM = "failover_gap_ms_sum"
NODE_LINKS_OPENED = "node_links_opened"
UNACKED_AUDIO_FRAMES_DROPPED = "unacked_audio_frames_dropped"
REPLIES_DEDUPLICATED = "replies_deduplicated"
REPLIES_CLEARED = "replies_cleared"


def relinks(outcome: str) -> str:
    """Counter of a call's relinks to a node, by outcome (``router.proxy``)."""
    return f"relinks_{outcome}"


def calls_refused(reason: str) -> str:
    """Counter of the calls refused at the trust boundary, by refusal reason
    (``callmesh.auth.errors``: token_expired, resume_denied...)."""
    return f"calls_refused_{reason}"


def refused(bound: str) -> str:
    """Counter of connections, calls or frames refused over a bound (``router.limits``:
    ``connections``, ``start_timeout``, ``tenant_calls``, ``frame_rate``, ``relinks``...)."""
    return f"refused_{bound}"


def client_errors(code: str) -> str:
    """Counter of the protocol errors sent to clients, by error code."""
    return f"client_errors_{code}"


# Twilio Media Streams.
TWILIO_STREAMS_ACCEPTED = "twilio_streams_accepted"
TWILIO_STREAMS_IDLE_CLOSED = "twilio_streams_idle_closed"
TWILIO_STREAMS_REFUSED = "twilio_streams_refused"
TWILIO_MALFORMED_MESSAGES = "twilio_malformed_messages"
TWILIO_UNKNOWN_EVENTS = "twilio_unknown_events"
TWILIO_EVENTS_OUTSIDE_STREAM = "twilio_events_outside_stream"
TWILIO_MEDIA_OUTSIDE_STREAM = "twilio_media_outside_stream"
TWILIO_DUPLICATE_STARTS = "twilio_duplicate_starts"
TWILIO_BAD_AGENT_AUDIO = "twilio_bad_agent_audio"
TWILIO_FRAMES_NOT_FORWARDED = "twilio_frames_not_forwarded"
TWILIO_WEBHOOK_CALLS = "twilio_webhook_calls"
TWILIO_WEBHOOK_BAD_SIGNATURE = "twilio_webhook_bad_signature"
TWILIO_WEBHOOK_NO_TENANT = "twilio_webhook_no_tenant"
TWILIO_WEBHOOK_NOT_CONFIGURED = "twilio_webhook_not_configured"
TWILIO_STREAM_SID_MISMATCH = "twilio_stream_sid_mismatch"
TWILIO_ACTION_RESUMED = "twilio_action_resumed"  # <Connect action>: a new stream
TWILIO_ACTION_HANGUP = "twilio_action_hangup"  # <Connect action>: the call had ended
ROUTER_DRAIN_MOVED = "router_drain_moved"  # callers asked to use another router
ROUTER_DRAIN_REFUSED = "router_drain_refused"  # connections refused while draining

# The browser console (router/console.py).
CONSOLE_CALLS_ACCEPTED = "console_calls_accepted"
CONSOLE_NODES_KILLED = "console_nodes_killed"  # development mode only


def twilio_refused(code: str) -> str:
    """Counter of the Twilio streams refused, by error code."""
    return f"twilio_refused_{code}"
