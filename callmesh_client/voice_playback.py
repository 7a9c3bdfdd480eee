"""A simulated phone's playback of agent audio: a real-time clock and its marks.

Agent audio is "played" at 8000 bytes/s (8 kHz mu-law) in arrival order. A mark is due
when playback reaches the audio that preceded it; ``clear`` drops what is queued and makes
every pending mark due at once, which is what Twilio does.
"""

from __future__ import annotations

from collections import deque

from callmesh.audio.format import TELEPHONY_RATE, AudioEncoding, bytes_per_second

PLAY_BYTES_PER_S = bytes_per_second(AudioEncoding.MULAW, TELEPHONY_RATE)


class Playback:
    def __init__(self) -> None:
        self.started_at = 0.0  # when the current run of playback began
        self.ends_at = 0.0  # when everything queued has been played
        self.last_audio_at = 0.0
        self._marks: deque[tuple[float, str]] = deque()

    def __repr__(self) -> str:
        return f"<Playback ends_at={self.ends_at:.3f} marks={len(self._marks)}>"

    def drained(self, now: float) -> bool:
        return now >= self.ends_at and not self._marks

    def audio(self, nbytes: int, now: float) -> bool:
        """Queue ``nbytes`` of audio; True when it starts a new run of playback."""
        starts = self.ends_at <= now
        if starts:
            self.started_at = now
        self.ends_at = max(now, self.ends_at) + nbytes / PLAY_BYTES_PER_S
        self.last_audio_at = now
        return starts

    def mark(self, name: str, now: float) -> bool:
        """Queue a mark; True when it is due at once (nothing left to play before it)."""
        if self.ends_at <= now:
            return True
        self._marks.append((self.ends_at, name))
        return False

    def due(self, now: float) -> list[str]:
        """Marks whose audio has been played, in order."""
        out = []
        while self._marks and self._marks[0][0] <= now:
            out.append(self._marks.popleft()[1])
        return out

    def clear(self, now: float) -> list[str]:
        """Drop the queued audio; every pending mark is echoed now."""
        self.ends_at = now
        out = [name for _, name in self._marks]
        self._marks.clear()
        return out
