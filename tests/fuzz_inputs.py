"""Hostile inputs for the fuzz suite (tests/test_fuzz_*.py), and its hypothesis settings.

Every strategy here produces what an attacker can put on the wire: valid-looking frames
with one field wrong, wrong JSON types, huge or negative numbers, oversized and unicode
strings, deep nesting, invalid base64, unknown fields, and raw garbage.

Settings: ``CALLMESH_FUZZ=ci`` (the default, what ``make test`` runs) is derandomized, so a
failure reproduces on every machine; ``CALLMESH_FUZZ=long`` runs 20 times as many
examples with fresh randomness each run, for a local soak.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from callmesh.protocol import INBOUND_TYPES

PROFILE = os.environ.get("CALLMESH_FUZZ", "ci")
SCALE = 20 if PROFILE == "long" else 1


def fuzz_settings(examples: int, *, shrink: bool = True) -> settings:
    """``examples`` generated inputs per ``make test`` (times SCALE for a long run).
    ``shrink=False`` where an example costs real sockets: report the failure as found."""
    return settings(
        phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if shrink else [])],
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=PROFILE != "long",
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# Numbers at and around every boundary a parser could get wrong.
EDGE_INTS = st.sampled_from(
    [0, -1, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]
)
hostile_ints = st.one_of(EDGE_INTS, st.integers())
hostile_numbers = st.one_of(
    hostile_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 1.5, -0.0, 1e308]),
)
# Unicode of every category, including surrogates' neighbours, RTL marks and NULs.
hostile_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        ["", " ", "\x00", "\u202e", "\ud7ff", "💥" * 10, "a.b", "*", ">", "{x}", "../", "\\"]
    ),
    st.text(alphabet="A", min_size=65, max_size=70),
)
json_scalars = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
bad_base64 = st.one_of(
    st.sampled_from(["", "=", "a", "ab=c", "!!!!", "AAAA====", "A\nA=", '"', "\\u0000"]),
    st.text(max_size=40),
)
good_base64 = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())


def deep(depth: int) -> str:
    """JSON nested ``depth`` levels deep (past the interpreter's recursion limit at 10**5)."""
    return "[" * depth + "]" * depth


deep_json = st.sampled_from([100, 1000, 100_000]).map(deep)

# The fields each inbound type reads, and plausible but wrong values for them.
FIELDS: dict[str, list[str]] = {
    "start": ["tenant", "caller", "audio", "last_seq", "token", "resume"],
    "user_text": ["text"],
    "audio": ["data", "ts"],
    "mark": ["name"],
    "dtmf": ["digit"],
    "hangup": [],
}
assert set(FIELDS) == INBOUND_TYPES


@st.composite
def native_frames(draw: st.DrawFn) -> dict[str, Any]:
    """An inbound frame of any type with its fields and ``seq`` perturbed."""
    kind = draw(st.sampled_from(sorted(FIELDS)) | hostile_text)
    frame: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        frame["seq"] = draw(st.one_of(st.integers(1, 10**6), hostile_numbers, json_values))
    for name in FIELDS.get(kind, []):
        if draw(st.integers(0, 3)) == 0:
            continue  # missing
        frame[name] = draw(
            st.one_of(
                json_values,
                good_base64,
                bad_base64,
                st.sampled_from(["demo", "caller-1", "0", "#", "1.2", "mulaw"]),
                st.fixed_dictionaries(
                    {
                        "encoding": json_values | st.sampled_from(["mulaw", "pcm16"]),
                        "sample_rate": hostile_numbers | st.sampled_from([8000, 16000, 24000]),
                    }
                ),
            )
        )
    extra = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=3))
    for key, value in extra.items():
        frame.setdefault(key, value)
    return frame


def as_wire(frame: object) -> str:
    return json.dumps(frame, ensure_ascii=False)


native_wire = st.one_of(
    native_frames().map(as_wire),
    json_values.map(as_wire),
    st.text(max_size=200),
    deep_json,
)


@st.composite
def twilio_messages(draw: st.DrawFn, stream_sid: str, call_sid: str) -> str:
    """A Twilio Media Streams event with fields perturbed, as text."""
    event = draw(
        st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop"]) | hostile_text
    )
    msg: dict[str, Any] = {"event": event}
    sid = draw(st.sampled_from([stream_sid, "MZother", "", "bad sid", None]) | json_values)
    if draw(st.booleans()):
        msg["streamSid"] = sid
    if event == "start":
        msg["start"] = draw(
            st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {
                        "callSid": st.sampled_from([call_sid, "CA-x", "", "a b"]) | json_values,
                        "streamSid": st.sampled_from([stream_sid, "MZ2"]) | json_values,
                        "customParameters": json_values
                        | st.fixed_dictionaries({"tenant": json_values | st.just("demo")}),
                        "mediaFormat": json_values
                        | st.just({"encoding": "audio/x-mulaw", "sampleRate": 8000}),
                    }
                ),
            )
        )
    elif event == "media":
        msg["media"] = draw(
            json_values
            | st.fixed_dictionaries(
                {
                    "payload": good_base64 | bad_base64 | json_values,
                    "timestamp": json_values | st.integers().map(str),
                }
            )
        )
    elif event == "mark":
        msg["mark"] = draw(json_values | st.fixed_dictionaries({"name": hostile_text}))
    elif event == "dtmf":
        msg["dtmf"] = draw(json_values | st.fixed_dictionaries({"digit": json_values}))
    return as_wire(msg)
