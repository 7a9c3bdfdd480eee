"""The failover buffer without sockets: unacknowledged frames kept and replayed, replies
de-duplicated across a change of owner (invariant 5: a relink is invisible to the caller).

The property tests simulate a call: the caller sends frames, the owner node applies
them, checkpoints and acknowledges, speaks replies, and its link breaks or it dies at
arbitrary points; a new owner restores the last checkpoint and gets the replayed frames.
The router's part is played by the real :class:`UnackedFrames` and :class:`ReplyDedup`,
driven the way :class:`router.proxy.ProxySession` drives them.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callmesh.protocol import MAX_DECIDED_TEXT_BYTES, In, Inbound, Out, encode
from router.failover_buffer import (
    CLEAR,
    DROP,
    HOLD,
    SEND,
    DecidedText,
    ReplyDedup,
    UnackedFrames,
    clear_frame,
)
from router.unacked_audio import audio_bytes

# The autouse task-leak fixture is function scoped; these tests run no event loop at all.
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def audio(seq: int, size: int = 160) -> Inbound:
    data = base64.b64encode(bytes(size)).decode()
    body = {"type": "audio", "seq": seq, "data": data}
    return Inbound(In.AUDIO, seq, body, encode(body))


def text(seq: int) -> Inbound:
    body = {"type": "user_text", "seq": seq, "text": f"utterance {seq}"}
    return Inbound(In.USER_TEXT, seq, body, encode(body))


def reply(turn: int, n: int, content: str, kind: str = Out.AGENT_TEXT.value) -> dict[str, Any]:
    field_of = {"agent_text": "text", "agent_audio": "data", "mark": "name"}
    return {"type": kind, "turn": turn, "n": n, field_of[kind]: content}


# ---------------------------------------------------------------------- UnackedFrames


def test_replay_is_every_unacked_frame_in_seq_order_and_ack_frees_up_to_seq() -> None:
    buf = UnackedFrames(max_frames=10, max_audio_bytes=10_000)
    for f in [audio(2), text(3), audio(4), audio(5), text(6), audio(7)]:
        assert (buf.keep_audio(f) == 0) if f.type is In.AUDIO else buf.keep(f)
    assert [f.seq for f in buf.replay()] == [2, 3, 4, 5, 6, 7]
    assert (len(buf), buf.audio_bytes) == (6, 4 * 160)
    buf.ack(4)  # inclusive: 4 is checkpointed
    assert [f.seq for f in buf.replay()] == [5, 6, 7]
    assert (len(buf), buf.audio_bytes) == (3, 2 * 160)
    buf.ack(3)  # an older ack changes nothing
    assert len(buf) == 3
    buf.ack(7)
    assert (buf.replay(), len(buf), buf.audio_bytes) == ([], 0, 0)


def test_replay_is_a_copy_frames_kept_meanwhile_are_not_in_it() -> None:
    buf = UnackedFrames(max_frames=10, max_audio_bytes=10_000)
    buf.keep(text(2))
    replay = buf.replay()
    buf.keep_audio(audio(3))
    assert [f.seq for f in replay] == [2]
    assert [f.seq for f in buf.replay()] == [2, 3]


def test_frames_other_than_audio_are_refused_beyond_the_count_audio_never() -> None:
    buf = UnackedFrames(max_frames=2, max_audio_bytes=10_000)
    assert buf.keep(text(2)) and buf.keep(text(3))
    assert not buf.keep(text(4))
    assert buf.keep_audio(audio(5)) == 0  # audio is bounded apart
    assert [f.seq for f in buf.replay()] == [2, 3, 5]
    buf.ack(2)
    assert buf.keep(text(6))
    assert [f.seq for f in buf.replay()] == [3, 5, 6]


def test_audio_beyond_its_bound_drops_the_oldest_audio_only() -> None:
    buf = UnackedFrames(max_frames=10, max_audio_bytes=3 * 160)
    buf.keep(text(2))
    assert [buf.keep_audio(audio(seq)) for seq in range(3, 8)] == [0, 0, 0, 1, 1]
    assert [f.seq for f in buf.replay()] == [2, 5, 6, 7]
    assert buf.audio_bytes == 3 * 160
    # A frame larger than the whole bound is still kept: the newest audio always stays.
    assert buf.keep_audio(audio(8, size=1000)) == 3
    assert [f.seq for f in buf.replay()] == [2, 8]
    assert buf.audio_bytes == 1000


def test_the_audio_bound_follows_the_format_of_the_start() -> None:
    buf = UnackedFrames(max_frames=1)
    buf.bound_audio(200, None)  # mu-law 8 kHz: 8 bytes a millisecond
    assert buf.max_audio_bytes == 1600
    buf.bound_audio(200, {"encoding": "pcm16", "sample_rate": 16000})
    assert buf.max_audio_bytes == 200 * 32
    buf.bound_audio(200, {"encoding": "mulaw", "sample_rate": 500})  # never below 1 a ms
    assert buf.max_audio_bytes == 200


@pytest.mark.parametrize("size", [0, 1, 2, 3, 160, 161, 162])
def test_audio_bytes_is_the_decoded_size(size: int) -> None:
    assert audio_bytes(audio(1, size)) == size


def test_unacked_frames_repr_summarises() -> None:
    buf = UnackedFrames(max_frames=4, max_audio_bytes=1000)
    buf.keep(text(2))
    buf.keep_audio(audio(3))
    assert repr(buf) == "<UnackedFrames [1 frames, 1 audio (160/1000 bytes)]>"


# ---------------------------------------------------------------------- ReplyDedup


def test_a_turn_said_again_the_same_is_held_back() -> None:
    d = ReplyDedup()
    first = [reply(1, n, f"a{n}") for n in range(3)]
    assert [d.offer(f["type"], encode(f), f) for f in first] == [SEND, SEND, SEND]
    d.relink()
    again = [reply(1, n, f"a{n}") for n in range(4)]
    assert [d.offer(f["type"], encode(f), f) for f in again] == [HOLD, HOLD, HOLD, SEND]
    assert d.complete(1)
    assert d.take_held() == []


def test_a_turn_said_differently_is_cleared_and_heard_from_its_start() -> None:
    d = ReplyDedup()
    for n in range(3):
        f = reply(1, n, f"a{n}")
        d.offer(f["type"], encode(f), f)
    d.relink()
    same, other = reply(1, 0, "a0"), reply(1, 1, "b1", Out.AGENT_AUDIO.value)
    assert d.offer(same["type"], encode(same), same) is HOLD
    assert d.offer(other["type"], encode(other), other) is CLEAR
    assert d.take_held() == [(same["type"], encode(same), same)]
    assert d.take_held() == []
    # What the caller has of turn 1 now is a0, b1: the rest of the new reply is new.
    nxt = reply(1, 2, "b2")
    assert d.offer(nxt["type"], encode(nxt), nxt) is SEND
    raw, clear = clear_frame(1)
    assert clear == {"type": "clear", "turn": 1, "reason": "failover"}
    assert raw == encode(clear)


def test_a_turn_said_again_after_a_clear_is_not_heard_twice() -> None:
    # Two relinks within one turn: the second owner re-says it differently (clear), the
    # third says it as the second did. The caller has a0, b1 once, and hears b2.
    d = ReplyDedup()
    for n in range(3):
        f = reply(1, n, f"a{n}")
        d.offer(f["type"], encode(f), f)
    d.relink()
    second = [reply(1, 0, "a0"), reply(1, 1, "b1")]
    assert [d.offer(f["type"], encode(f), f) for f in second] == [HOLD, CLEAR]
    assert [h[2] for h in d.take_held()] == [second[0]]
    d.relink()
    third = [*second, reply(1, 2, "b2")]
    assert [d.offer(f["type"], encode(f), f) for f in third] == [HOLD, HOLD, SEND]


def test_replies_of_a_complete_turn_are_dropped() -> None:
    d = ReplyDedup()
    f = reply(0, 0, "hello")
    assert d.offer(f["type"], encode(f), f) is SEND
    assert d.complete(0) and not d.complete(0)
    assert d.offer(f["type"], encode(f), f) is DROP
    assert d.completed_turn == 0
    assert repr(d) == "<ReplyDedup [turn 0 complete, 0 delivered, 0 held]>"


def test_a_reply_resumed_after_its_turn_completed_still_reaches_the_caller() -> None:
    """A reply cleared at caller noise and resumed goes on after its turn's metrics (the
    turn committed while the caller was still playing it)."""
    d = ReplyDedup()
    f = reply(1, 0, "hello")
    d.offer(f["type"], encode(f), f)
    d.complete(1)
    resumed = {**reply(1, 5, "hello"), "resumed": True}
    assert d.offer(resumed["type"], encode(resumed), resumed) is SEND
    assert d.offer(f["type"], encode(f), f) is DROP  # said again by a new owner: not
    faked = {**f, "resumed": "yes"}
    assert d.offer(faked["type"], encode(faked), faked) is DROP


def test_relink_forgets_what_the_previous_link_held() -> None:
    d = ReplyDedup()
    f = reply(2, 0, "x")
    d.offer(f["type"], encode(f), f)
    d.offer(f["type"], encode(f), f)
    assert repr(d) == "<ReplyDedup [turn -1 complete, 1 delivered, 1 held]>"
    d.relink()
    assert d.take_held() == []


# ---------------------------------------------------------------------- DecidedText


def decided(turn: int, seq: int, text: str = "Sure. What day works best?") -> dict[str, Any]:
    return {
        "type": "decided",
        "turn": turn,
        "seq": seq,
        "text": text,
        "llm": ["simulated-llm", "simulated-llm"],
        "node": "node-a",
    }


def test_a_decided_text_is_kept_until_its_turn_is_acknowledged() -> None:
    kept = DecidedText()
    assert kept.offer(decided(3, 7), completed_turn=2)
    fields = {k: v for k, v in decided(3, 7).items() if k != "type"}
    assert kept.kept == fields  # what a new owner's start carries
    kept.ack(6, 2)  # an earlier turn's checkpoint: still in flight
    assert kept.kept == fields
    kept.ack(7, 3)  # the turn is checkpointed: forgotten, like its unacked frames
    assert kept.kept is None
    assert repr(kept) == "<DecidedText [nothing]>"


def test_a_decided_text_is_forgotten_when_its_turn_is_complete() -> None:
    kept = DecidedText()
    assert kept.offer(decided(3, 7), completed_turn=2)
    kept.complete(2)
    assert kept.kept is not None
    kept.complete(3)
    assert kept.kept is None


def test_only_the_latest_turn_is_kept_and_never_a_complete_one() -> None:
    kept = DecidedText()
    assert not kept.offer(decided(2, 5), completed_turn=2)  # the caller has turn 2 whole
    assert kept.offer(decided(3, 7), completed_turn=2)
    assert not kept.offer(decided(2, 5, "older"), completed_turn=1)
    assert kept.offer(decided(4, 9, "newer"), completed_turn=2)
    assert kept.kept is not None and (kept.kept["turn"], kept.kept["text"]) == (4, "newer")


@pytest.mark.parametrize(
    "bad",
    [
        {"text": "x" * (MAX_DECIDED_TEXT_BYTES + 1)},
        {"text": "é" * (MAX_DECIDED_TEXT_BYTES // 2 + 1)},  # over the bound in UTF-8 bytes
        {"text": ""},
        {"text": 5},
        {"turn": "3"},
        {"turn": 0},
        {"seq": -1},
        {"llm": "simulated"},
        {"llm": ["a", "b", "c"]},
        {"llm": ["a", "m" * 200]},
        {"node": ["a"]},
    ],
)
def test_a_malformed_or_oversized_decided_text_is_not_kept(bad: dict[str, Any]) -> None:
    kept = DecidedText()
    assert not kept.offer({**decided(3, 7), **bad}, completed_turn=0)
    assert kept.kept is None


# ---------------------------------------------------------------------- a simulated call

TURNS = 4


@dataclass
class Owner:
    """The owner node as far as failover sees it: applies frames, checkpoints, speaks."""

    gen: int
    applied: list[int]  # caller seqs applied, in order (its ``last_seq`` is the last)
    inbox: deque[Inbound] = field(default_factory=deque)
    acks: deque[int] = field(default_factory=deque)  # acks on their way to the router
    turn: int = 0
    n: int = 0
    version: list[tuple[str, str]] | None = None  # its reply to ``turn``: (kind, content)

    @property
    def last_seq(self) -> int:
        return self.applied[-1] if self.applied else 1  # 1: the start


@dataclass
class Call:
    """The caller, the router's failover buffer and the owner nodes of one call."""

    unacked: UnackedFrames = field(default_factory=lambda: UnackedFrames(10**6, 10**9))
    replies: ReplyDedup = field(default_factory=ReplyDedup)
    sent: list[int] = field(default_factory=list)
    next_seq: int = 2
    checkpoint: list[int] = field(default_factory=list)
    owner: Owner = field(default_factory=lambda: Owner(0, []))
    said: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # latest version
    heard: dict[int, list[str]] = field(default_factory=dict)
    caller_done: set[int] = field(default_factory=set)

    # caller → router → node
    def caller_sends(self, is_audio: bool) -> None:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        frame = audio(seq) if is_audio else text(seq)
        assert (self.unacked.keep_audio(frame) == 0) if is_audio else self.unacked.keep(frame)
        self.sent.append(seq)
        self.owner.inbox.append(frame)  # forwarded live

    def node_applies(self) -> None:
        o = self.owner
        if o.inbox:
            frame = o.inbox.popleft()
            if frame.seq > o.last_seq:  # at or below: applied before (a replay)
                o.applied.append(frame.seq)

    def node_checkpoints(self) -> None:
        self.checkpoint = list(self.owner.applied)
        self.owner.acks.append(self.owner.last_seq)

    def router_reads_ack(self) -> None:
        if self.owner.acks:
            self.unacked.ack(self.owner.acks.popleft())

    # node → router → caller
    def node_speaks(self, data: st.DataObject) -> None:
        o = self.owner
        if o.turn >= TURNS:
            return
        if o.version is None:
            o.version = self._version_of(o, data)
        if o.n < len(o.version):
            kind, content = o.version[o.n]
            self._router_forwards(reply(o.turn, o.n, content, kind))
            o.n += 1
            return
        if self.replies.complete(o.turn):
            assert self.heard.get(o.turn, []) == [c for _, c in o.version], "caller's turn"
            self.caller_done.add(o.turn)
        o.turn, o.n, o.version = o.turn + 1, 0, None

    def _version_of(self, o: Owner, data: st.DataObject) -> list[tuple[str, str]]:
        """This owner's reply to its turn: what was said before, or a reply that keeps a
        prefix of it and then says something else (a re-answer)."""
        before = self.said.get(o.turn, [])
        if before and data.draw(st.booleans(), label="says the same"):
            return before
        keep = data.draw(st.integers(0, len(before)), label="same frames first")
        kinds = st.sampled_from([k.value for k in (Out.AGENT_TEXT, Out.AGENT_AUDIO, Out.MARK)])
        new = data.draw(st.lists(kinds, min_size=1, max_size=3), label="new frames")
        version = before[:keep] + [(k, f"t{o.turn}.g{o.gen}.{i}") for i, k in enumerate(new)]
        self.said[o.turn] = version
        return version

    def _router_forwards(self, frame: dict[str, Any]) -> None:
        """What router.upstream.NodeFrames does with a reply frame, the caller's side included."""
        kind, raw = frame["type"], encode(frame)
        verdict = self.replies.offer(kind, raw, frame)
        if verdict is SEND:
            self._caller_hears(frame)
        elif verdict is CLEAR:
            _, clear = clear_frame(frame["turn"])
            self.heard[clear["turn"]] = []  # the caller drops the turn's partial reply
            for _, _, held in self.replies.take_held():
                self._caller_hears(held)
            self._caller_hears(frame)

    def _caller_hears(self, frame: dict[str, Any]) -> None:
        turn = frame["turn"]
        assert turn not in self.caller_done, f"a reply frame after turn {turn} ended"
        content = frame.get("text") or frame.get("data") or frame.get("name")
        self.heard.setdefault(turn, []).append(content)

    # relinks
    def relink(self, *, node_died: bool, back: int) -> None:
        """The link ends. A dead node's successor restores the last checkpoint; a node
        whose link broke keeps its state. In-flight frames and acks are lost either way;
        the new link gets the unacknowledged frames and says its reply over."""
        old = self.owner
        applied = list(self.checkpoint) if node_died else old.applied
        new = Owner(old.gen + 1, applied)
        # The new owner is told the caller's last complete turn (``delivered_turn``) and
        # speaks from the next one; ``back`` makes it say a complete one again too.
        new.turn = max(0, self.replies.completed_turn + 1 - back)
        self.owner = new
        self.replies.relink()
        new.inbox.extend(self.unacked.replay())

    def finish(self, data: st.DataObject) -> None:
        """The last owner lives: it applies everything, acknowledges, says every turn."""
        while self.owner.inbox:
            self.node_applies()
        self.node_checkpoints()
        while self.owner.acks:
            self.router_reads_ack()
        while self.owner.turn < TURNS:
            self.node_speaks(data)


ACTIONS = [
    "send_audio",
    "send_text",
    "apply",
    "checkpoint",
    "ack",
    "speak",
    "speak",
    "link",
    "death",
]


@PROPERTY
@given(st.data())
def test_every_frame_is_applied_once_and_every_reply_heard_once_across_relinks(
    data: st.DataObject,
) -> None:
    call = Call()
    steps = data.draw(st.lists(st.sampled_from(ACTIONS), min_size=10, max_size=80), label="steps")
    relinks = 0
    for step in steps:
        if step in ("send_audio", "send_text"):
            call.caller_sends(step == "send_audio")
        elif step == "apply":
            call.node_applies()
        elif step == "checkpoint":
            call.node_checkpoints()
        elif step == "ack":
            call.router_reads_ack()
        elif step == "speak":
            call.node_speaks(data)
        elif relinks < 6:
            relinks += 1
            back = data.draw(st.integers(0, 1), label="says a complete turn again")
            call.relink(node_died=step == "death", back=back)
    call.finish(data)
    # Every frame the caller sent is applied once, in order, by the owner that lives on.
    assert call.owner.applied == call.sent
    assert (len(call.unacked), call.unacked.audio_bytes) == (0, 0)
    # Every turn reached the caller to its end, each reply frame once (checked per turn
    # as its turn_metrics reached the caller, against the reply of the owner that sent it).
    assert call.caller_done == set(range(TURNS))


@PROPERTY
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 400)), max_size=60),
    st.integers(1, 2000),
    st.integers(1, 8),
)
def test_the_bounds_hold_and_only_the_oldest_audio_goes(
    frames: list[tuple[bool, int]], max_audio: int, max_frames: int
) -> None:
    buf = UnackedFrames(max_frames, max_audio)
    kept: list[Inbound] = []
    for seq, (is_audio, size) in enumerate(frames, start=2):
        if is_audio:
            frame = audio(seq, size)
            buf.keep_audio(frame)
            kept.append(frame)
            # Oldest first: drop audio from the front until within the bound (or one left).
            audio_kept = [f for f in kept if f.type is In.AUDIO]
            while sum(audio_bytes(f) for f in audio_kept) > max_audio and len(audio_kept) > 1:
                kept.remove(audio_kept.pop(0))
        elif buf.keep(text(seq)):
            kept.append(text(seq))
        assert sum(f.type is not In.AUDIO for f in kept) <= max_frames
        assert [f.seq for f in buf.replay()] == [f.seq for f in kept]
        assert buf.audio_bytes == sum(audio_bytes(f) for f in kept if f.type is In.AUDIO)


@PROPERTY
@given(st.data())
def test_every_reply_frame_is_heard_once_across_many_relinks_within_a_turn(
    data: st.DataObject,
) -> None:
    # Replies only, and relinks often: a turn said over by several owners in a row.
    call = Call()
    steps = data.draw(
        st.lists(st.sampled_from(["speak"] * 3 + ["death"]), min_size=10, max_size=60),
        label="steps",
    )
    for step in steps:
        if step == "speak":
            call.node_speaks(data)
        else:
            call.relink(node_died=True, back=0)
    call.finish(data)
    assert call.caller_done == set(range(TURNS))
