"""PII redaction (issue 15, item 6): detection, both modes, secrets in URLs and settings,
the log filter, the effects sinks' logs, and a whole call whose caller says a card
number, an e-mail address and a phone number: none of them reaches the event log on
JetStream or the logs, replay shows the redacted form and still verifies."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh import redaction
from callmesh import settings as callmesh_settings
from callmesh.redaction import (
    PiiKind,
    RedactionConfig,
    RedactionMode,
    Redactor,
    find_pii,
    mask_secrets,
)
from callmesh.settings import ConfigError
from callmesh.settings.table import NODE, REPLAY, ROUTER, WORKER
from callmesh.telemetry import JsonFormatter, RedactingFilter, setup_logging
from conversation_node.providers.base import LLMDelta, LLMRequest, ToolCall
from conversation_node.providers.simulated import SimulatedLLM
from events import eventlog
from events.eventlog import EventType
from events.replay import build_report, read_records
from events.replay_html import render_html
from events.replay_text import format_text
from events.sinks import Effect, LogSink, WebhookSink
from events.streams import ensure_streams
from events.worker import EffectsWorker
from events.worker_config import WorkerConfig
from state_store.store import StateStore
from tests.cluster_helpers import eventually

KEY = "k" * 32
MASK = Redactor(RedactionConfig())
HASH = Redactor(RedactionConfig(RedactionMode.HASH, KEY))


def kinds(text: str) -> list[tuple[str, str]]:
    return [(f.kind.value, f.value) for f in find_pii(text)]


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "text, value",
    [
        ("card 4242 4242 4242 4242 please", "4242 4242 4242 4242"),
        ("card 4242-4242-4242-4242.", "4242-4242-4242-4242"),
        ("4111111111111111", "4111111111111111"),
        ("amex 3782 822463 10005 ok", "3782 822463 10005"),
        ("spoken 4 2 4 2 4 2 4 2 4 2 4 2 4 2 4 2", "4 2 4 2 4 2 4 2 4 2 4 2 4 2 4 2"),
        ("19 digits 6011000990139424009 end", "6011000990139424009"),
    ],
)
def test_cards_are_found(text: str, value: str) -> None:
    assert kinds(text) == [("card", value)]


@pytest.mark.parametrize(
    "text, value",
    [
        ("call +14155550123 now", "+14155550123"),
        ("call +1 415 555 0123.", "+1 415 555 0123"),
        ("call +1 (415) 555-0123", "+1 (415) 555-0123"),
        ("uk +44 20 7946 0958", "+44 20 7946 0958"),
        ("(415) 555-0123", "(415) 555-0123"),
        ("it's 415-555-0123, thanks", "415-555-0123"),
        ("415.555.0123", "415.555.0123"),
        ("4155550123", "4155550123"),
        ("1-415-555-0123", "1-415-555-0123"),
        ("london 020 7946 0958", "020 7946 0958"),
        ("mobile 07911 123456", "07911 123456"),
        ("paris 01 23 45 67 89", "01 23 45 67 89"),
        ("berlin 030 12345678", "030 12345678"),
    ],
)
def test_phones_are_found(text: str, value: str) -> None:
    assert kinds(text) == [("phone", value)]


@pytest.mark.parametrize(
    "text, value",
    [
        ("mail alice.smith@example.com.", "alice.smith@example.com"),
        ("J.Doe+calls@mail.example.co.uk,", "J.Doe+calls@mail.example.co.uk"),
        ("<bob_99@sub-domain.example.org>", "bob_99@sub-domain.example.org"),
    ],
)
def test_emails_are_found(text: str, value: str) -> None:
    assert kinds(text) == [("email", value)]


@pytest.mark.parametrize(
    "text",
    [
        "How about 3:00 pm on Tuesday",
        "at 10:30am or 15:45",
        "on 2026-12-02 or 12/02/2026 or 02.12.2026 or 01-12-2026",
        "2026-12-02 15:30",
        "It costs $1,299.00 or 1299.99 dollars or €12.50",
        "booking BK-20261202-0042 and ref #A1B2C3",
        "order 1234567890123 (fails Luhn)",
        "order 4242424242424241",
        "in 2026 and 1999",
        "version 1.2.3.4 at 192.168.1.10:8080",
        "room 555, floor 12, zip 94107",
        "call id call-4155550123 and CA4155550123abcdef4242424242424242",
        "user@localhost is not an address, nor is @handle",
    ],
)
def test_ordinary_numbers_are_not_pii(text: str) -> None:
    assert find_pii(text) == []


def test_a_card_inside_a_longer_run_of_digits_is_found() -> None:
    # Followed by its expiry and security code, or preceded by other digits.
    assert kinds("card 4242 4242 4242 4242 12 27 123") == [("card", "4242 4242 4242 4242")]
    assert kinds("it's 1 4242 4242 4242 4242") == [("card", "4242 4242 4242 4242")]
    assert MASK.redact_text("4242 4242 4242 4242 123") == "[card ••••4242] 123"


def test_an_email_wins_over_the_digits_in_it() -> None:
    assert kinds("4155550123@example.com") == [("email", "4155550123@example.com")]


def test_several_findings_in_order() -> None:
    text = "I'm Alice, 4242 4242 4242 4242, alice@example.com, +1 415 555 0123."
    assert [k for k, _ in kinds(text)] == ["card", "email", "phone"]


# ----------------------------------------------------------------------------- modes


def test_mask_mode() -> None:
    text = "card 4242 4242 4242 4242, mail alice@example.com, phone (415) 555-0123"
    assert MASK.redact_text(text) == (
        "card [card ••••4242], mail [email a•••@example.com], phone [phone ••••0123]"
    )


def test_hash_mode_is_keyed_stable_and_normalised() -> None:
    a = HASH.redact_text("phone +1 415 555 0123")
    assert a.startswith("phone [phone#") and a.endswith("]") and "0123" not in a
    # The same number however it was written; the same e-mail in any case.
    assert HASH.redact_text("phone (415) 555-0123") == a
    assert HASH.redact_text("phone 4155550123") == a
    assert HASH.redact_text("x ALICE@Example.com") == HASH.redact_text("x alice@example.com")
    assert HASH.redact_text("4242-4242-4242-4242") == HASH.redact_text("4242424242424242")
    # Another value, another key: other hashes.
    assert HASH.redact_text("phone +1 415 555 0124") != a
    other = Redactor(RedactionConfig(RedactionMode.HASH, "x" * 32))
    assert other.redact_text("phone +1 415 555 0123") != a


def test_hash_mode_needs_a_long_key() -> None:
    with pytest.raises(ValueError):
        RedactionConfig(RedactionMode.HASH, "short")
    with pytest.raises(ValueError):
        RedactionConfig.from_env({"CALLMESH_REDACTION_MODE": "plain"})
    cfg = RedactionConfig.from_env(
        {"CALLMESH_REDACTION_MODE": "hash", "CALLMESH_REDACTION_KEY": KEY}
    )
    assert cfg.mode is RedactionMode.HASH and KEY not in repr(cfg)
    assert RedactionConfig.from_env({}).mode is RedactionMode.MASK


@pytest.mark.parametrize("redactor", [MASK, HASH], ids=["mask", "hash"])
def test_redaction_is_idempotent(redactor: Redactor) -> None:
    text = "4242 4242 4242 4242 / alice@example.com / +44 20 7946 0958 / 415-555-0123"
    once = redactor.redact_text(text)
    assert redactor.redact_text(once) == once
    assert find_pii(once) == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 -+().@abcxyz:/#•[]"), max_size=80))
def test_redacting_anything_twice_changes_nothing_more(text: str) -> None:
    for redactor in (MASK, HASH):
        once = redactor.redact_text(text)
        assert redactor.redact_text(once) == once


def test_values_are_redacted_but_ids_are_kept() -> None:
    rec = {
        "type": "user_turn",
        "call_id": "4155550123",
        "text": "my number is 415 555 0123",
        "payload": {"phone": "+14155550123", "slots": ["alice@example.com", 3]},
    }
    out = MASK.redact_value(rec)
    assert out["call_id"] == "4155550123" and out["type"] == "user_turn"
    assert out["text"] == "my number is [phone ••••0123]"
    assert out["payload"] == {"phone": "[phone ••••0123]", "slots": ["[email a•••@example.com]", 3]}
    assert rec["text"] == "my number is 415 555 0123"  # a copy: the input is untouched


def test_long_input_is_handled() -> None:
    # No catastrophic backtracking on hostile shapes (bounded by size, not by a timer).
    for text in ("a." * 50_000 + "@", "1 " * 50_000, "a@" * 50_000, "+1" * 50_000):
        MASK.redact_text(text)


# ----------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "url, masked",
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pa55@redis.example.com", "rediss://user:***@redis.example.com"),
        ("https://tok3n@crm.example.com/x", "https://***@crm.example.com/x"),
        (
            "https://crm.example.com/hook?api_key=abc&tenant=acme&sig=zz",
            "https://crm.example.com/hook?api_key=***&tenant=acme&sig=***",
        ),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_credentials_of_urls_in_text_are_masked(url: str, masked: str) -> None:
    assert mask_secrets(url) == masked
    assert MASK.redact_text(f"connecting to {url} now") == f"connecting to {masked} now"


def test_redaction_settings_are_declared_and_checked() -> None:
    for process in (ROUTER, NODE, WORKER, REPLAY):
        assert callmesh_settings.load(process, {})["redaction_mode"] == "mask"
        with pytest.raises(ConfigError):
            callmesh_settings.load(process, {"CALLMESH_REDACTION_MODE": "hash"})  # no key
        with pytest.raises(ConfigError):
            callmesh_settings.load(process, {"CALLMESH_REDACTION_MODE": "plain"})
        values = callmesh_settings.load(
            process, {"CALLMESH_REDACTION_MODE": "hash", "CALLMESH_REDACTION_KEY": KEY}
        )
        assert KEY not in repr(values)
        # The redactor reads the same variables the same way.
        env = {"CALLMESH_REDACTION_MODE": "hash", "CALLMESH_REDACTION_KEY": KEY}
        assert RedactionConfig.from_env(env) == RedactionConfig(RedactionMode.HASH, KEY)


# ----------------------------------------------------------------------------- boundaries


def _log_line(logger: logging.Logger, handler: logging.Handler, *args: Any, **kw: Any) -> None:
    logger.addHandler(handler)
    try:
        logger.warning(*args, **kw)
    finally:
        logger.removeHandler(handler)


def test_log_filter_redacts_message_args_fields_and_traceback() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter(MASK))
    logger = logging.getLogger("test.redaction.filter")
    logger.propagate = False
    try:
        raise ValueError("card 4242424242424242 refused")
    except ValueError:
        _log_line(
            logger,
            handler,
            "caller %s said %r at %d",
            "+1 415 555 0123",
            "mail me at alice@example.com",
            3,
            exc_info=True,
            extra={"fields": {"url": "redis://:pw@h", "call_id": "4155550123"}},
        )
    line = json.loads(buf.getvalue())
    assert line["msg"] == "caller [phone ••••0123] said 'mail me at [email a•••@example.com]' at 3"
    assert line["url"] == "redis://:***@h" and line["call_id"] == "4155550123"
    assert "4242424242424242" not in line["exc"] and "[card ••••4242]" in line["exc"]


async def test_log_sink_redacts_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    effect = Effect(
        "c:1:0", "acme", "c", 1, 0, "booking_create", {"phone": "+14155550123", "name": "Al"}
    )
    with caplog.at_level(logging.INFO, logger="events.sinks"):
        await LogSink().deliver(effect)
    assert "+14155550123" not in caplog.text and "[phone ••••0123]" in caplog.text


def test_webhook_sink_never_shows_its_credentials() -> None:
    sink = WebhookSink("https://user:pw@crm.example.com/{tenant}?token=abc")
    assert "pw" not in repr(sink) and "abc" not in repr(sink)


# ----------------------------------------------------------------------------- a whole call

CARD, EMAIL, PHONE = "4242 4242 4242 4242", "alice.smith@example.com", "+1 415 555 0123"
# Every way the three could show up verbatim.
RAW = [CARD, CARD.replace(" ", ""), EMAIL, "alice.smith", PHONE, "14155550123", "415 555 0123"]
SCRIPT = [
    "Hi, my name is Alice",
    f"My card is {CARD}, my email is {EMAIL} and my phone is {PHONE}",
    "I'd like a cleaning",
    "Tuesday works",
    "How about 3pm",
    "Yes, book it",
]


class ContactBookingLLM:
    """The simulated model, booking with the caller's contact details as a real model
    would (they reach the effect's payload, the event log and the log sink)."""

    name = "contact-booking"

    def __init__(self, inner: SimulatedLLM) -> None:
        self._inner = inner

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        async for delta in self._inner.stream(request):
            call = delta.tool_call
            if call is not None and call.name == "create_booking":
                args = {**call.arguments, "phone": PHONE, "email": EMAIL}
                delta = LLMDelta(tool_call=ToolCall(call.id, call.name, args))
            yield delta


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record of the test process, through the handler processes install."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    buf = io.StringIO()
    setup_logging("DEBUG", stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


async def _whole_log(
    js: JetStreamContext, tenant: str, call_id: str, *, delivered: bool = False
) -> list[dict[str, Any]]:
    """The call's event log once its call_ended record is published (and, ``delivered``,
    the effects worker's delivery record: the worker appends it whenever it delivers, so
    it may come before or after the call's end)."""
    wanted = {"call_ended", "effect_delivery"} if delivered else {"call_ended"}
    for _ in range(200):
        records = await read_records(js, tenant, call_id)
        if wanted <= {r["type"] for r in records}:
            return records
        await asyncio.sleep(0.05)
    raise AssertionError("event log incomplete")


def _absent(text: str) -> list[str]:
    return [raw for raw in RAW if raw in text]


async def test_a_call_leaves_no_pii_in_the_event_log_or_logs(
    redis_url: str,
    nats_url: str,
    redis: Redis,
    js: JetStreamContext,
    captured_logs: io.StringIO,
) -> None:
    redaction.configure(None)  # the process default: mask
    await ensure_streams(js)
    providers = simulated_providers()
    providers.llm = ContactBookingLLM(providers.llm)  # type: ignore[arg-type]
    fast = WorkerConfig(durable="redaction", fetch_timeout_s=0.2, drain_timeout_s=2.0)
    async with (
        running_node(redis_url, nats_url, providers) as (_, url),
        EffectsWorker(js, LogSink(), fast) as worker,
        node_call(url, "pii-1") as call,
    ):
        await call.start(tenant="acme", caller="14155550123", audio=False)
        for turn, line in enumerate(SCRIPT, start=1):
            await call.send(type="user_text", text=line)
            await call.turn(turn)
        assert "booked" in call.reply_text(len(SCRIPT))
        await call.send(type="hangup")
        await eventually(lambda: worker.metrics.delivered >= 1)

        records = await _whole_log(js, "acme", "pii-1", delivered=True)

    # The event log on JetStream: the redacted form, never the raw values.
    log_text = json.dumps(records, ensure_ascii=False)
    assert _absent(log_text) == []
    for masked in ("[card ••••4242]", "[email a•••@example.com]", "[phone ••••0123]"):
        assert masked in log_text
    effect = next(r for r in records if r["type"] == EventType.EFFECT)
    assert effect["payload"]["phone"] == "[phone ••••0123]"

    # The logs, including the effects log sink's line for the booking.
    lines = captured_logs.getvalue().splitlines()
    logs = "\n".join(json.dumps(json.loads(line), ensure_ascii=False) for line in lines)
    assert _absent(logs) == []
    assert "[email a•••@example.com]" in logs and "booking" in logs

    # The checkpoint keeps what the conversation needs, unredacted ...
    ckpt = await StateStore(redis).load("acme", "pii-1")
    assert ckpt is not None
    assert any(CARD in exchange[1] for exchange in ckpt.working)
    # ... and replay shows the redacted form, yet verifies against it.
    report = build_report("acme", "pii-1", records, ckpt)
    assert report.divergences == [] and report.verified is True
    shown = format_text(report) + render_html(report) + json.dumps(report.to_dict())
    assert _absent(shown) == []
    assert "[card ••••4242]" in format_text(report)
    # Redaction hides values, not differences: a log that says another card diverges.
    forged = json.loads(json.dumps(records, ensure_ascii=False).replace("••••4242", "••••1111"))
    diverged = build_report("acme", "pii-1", forged, ckpt).divergences
    assert [d.field for d in diverged] == ["working"]


async def test_the_outbox_boundary_redacts_in_hash_mode() -> None:
    redaction.configure(HASH)
    try:
        rec = eventlog.record(EventType.USER_TURN, 1, seq=2, text=f"call me on {PHONE}")
        (entry,) = eventlog.to_outbox("acme", "c-1", [rec], 0)
    finally:
        redaction.configure(None)
    (logged,) = eventlog.decode_message(entry.data)
    text = logged["text"]
    assert text.startswith("call me on [phone#") and "0123" not in text
    assert PiiKind.PHONE.value in text


def test_digits_of_any_script() -> None:
    arabic = "٤٢٤٢ ٤٢٤٢ ٤٢٤٢ ٤٢٤٢"  # 4242 4242 4242 4242 in Arabic-Indic digits
    assert MASK.redact_text(f"card {arabic}") == "card [card ••••4242]"
    assert HASH.redact_text(arabic) == HASH.redact_text("4242 4242 4242 4242")
