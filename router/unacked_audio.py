"""The caller's unacknowledged audio, kept compactly until its owner node acknowledges it.

A call keeps on average some 70 frames (1.4 s) of it: what a node acknowledges only once
it is more than a second old, and the utterance in progress. Kept as the frames' text
(a str of ~270 characters for 160 bytes of mu-law, and an object per frame) it was ~28 KB
of every audio call on a router; kept as the decoded audio in one buffer and the frames'
numbers and timestamps in arrays, it is ~185 bytes a frame. A frame's text is rebuilt on
replay (a failover, rare), byte for byte the text that came in: a frame is kept compactly
only if its text is exactly what the rebuild gives (the spelling of
:func:`audio_frame_text`, canonical base64); any other spelling is kept as its text.
"""

from __future__ import annotations

import binascii
from array import array
from bisect import bisect_right

from callmesh.protocol import Inbound, audio_frame

_NO_TS = -1  # a frame without ``ts`` (a frame with a negative one is kept as text)
_MAX_TS = 2**63 - 1


def audio_frame_text(seq: int, data: bytes, ts: int | None) -> str:
    """An ``audio`` frame's text as the router (Twilio) and callmesh's clients write it."""
    return audio_frame(seq, binascii.b2a_base64(data, newline=False).decode("ascii"), ts)


def audio_bytes(frame: Inbound) -> int:
    """Bytes of audio in an ``audio`` frame, from its base64 length (never decoded)."""
    data: str = frame.body["data"]
    n = len(data) * 3 >> 2
    if data.endswith("="):
        n -= 2 if data.endswith("==") else 1
    return n


class ReplayedAudio:
    """One unacknowledged audio frame as replayed: its number, text and bytes of audio."""

    __slots__ = ("raw", "seq", "size")

    def __init__(self, seq: int, raw: str, size: int) -> None:
        self.seq = seq
        self.raw = raw
        self.size = size

    def __repr__(self) -> str:
        return f"<ReplayedAudio seq={self.seq} {self.size} bytes>"


class UnackedAudio:
    """Audio frames in ``seq`` order (seqs strictly increase), oldest first."""

    __slots__ = ("_data", "_seqs", "_sizes", "_stamps", "_text", "bytes")

    def __init__(self) -> None:
        self._seqs = array("q")
        self._stamps = array("q")  # each frame's ``ts``, or _NO_TS
        self._sizes = array("I")  # each frame's bytes of audio
        # The decoded audio of the frames kept compactly, concatenated oldest first (a
        # bytearray drops its front without moving the rest).
        self._data = bytearray()
        # seq → text of the frames not in the rebuilt spelling (none, from the router's
        # own Twilio frames and callmesh's clients).
        self._text: dict[int, str] | None = None
        self.bytes = 0  # of audio, all frames

    def __len__(self) -> int:
        return len(self._seqs)

    def append(self, frame: Inbound) -> int:
        """Keep one audio frame (its seq above every kept one's); its bytes of audio."""
        body, seq = frame.body, frame.seq
        ts = body.get("ts")
        data = _decoded(body["data"])
        if (
            data is not None
            and (ts is None or (type(ts) is int and 0 <= ts <= _MAX_TS))
            and frame.raw == audio_frame_text(seq, data, ts)
        ):
            self._data += data
            size = len(data)
            self._stamps.append(_NO_TS if ts is None else ts)
        else:
            if self._text is None:
                self._text = {}
            self._text[seq] = frame.raw
            size = audio_bytes(frame)
            self._stamps.append(_NO_TS)
        self._seqs.append(seq)
        self._sizes.append(size)
        self.bytes += size
        return size

    def ack(self, seq: int) -> None:
        """Forget every frame up to ``seq``."""
        self._drop(bisect_right(self._seqs, seq))

    def bound(self, max_bytes: int) -> int:
        """Drop the oldest frames while more than ``max_bytes`` are kept, keeping at least
        the newest; how many went."""
        sizes, total, n = self._sizes, self.bytes, 0
        last = len(sizes) - 1
        while total > max_bytes and n < last:
            total -= sizes[n]
            n += 1
        self._drop(n)
        return n

    def _drop(self, n: int) -> None:
        if n <= 0:
            return
        sizes, text = self._sizes, self._text
        dropped = sum(sizes[:n])
        stored = dropped
        if text is not None:
            for seq, size in zip(self._seqs[:n], sizes[:n], strict=True):
                if text.pop(seq, None) is not None:
                    stored -= size  # kept as text, not in the buffer
            if not text:
                self._text = None
        del self._data[:stored]
        del self._seqs[:n]
        del self._stamps[:n]
        del sizes[:n]
        self.bytes -= dropped

    def replay(self) -> list[ReplayedAudio]:
        """Every kept frame, oldest first, with the text it came in."""
        out: list[ReplayedAudio] = []
        data, text, at = self._data, self._text or {}, 0
        for seq, ts, size in zip(self._seqs, self._stamps, self._sizes, strict=True):
            raw = text.get(seq)
            if raw is None:
                payload = bytes(data[at : at + size])
                at += size
                raw = audio_frame_text(seq, payload, None if ts == _NO_TS else ts)
            out.append(ReplayedAudio(seq, raw, size))
        return out


def _decoded(b64: object) -> bytes | None:
    if type(b64) is not str:
        return None
    try:
        return binascii.a2b_base64(b64, strict_mode=True)
    except ValueError:  # binascii.Error is one; so is non-ASCII text
        return None
