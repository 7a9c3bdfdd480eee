"""pocketsphinx decoders in worker processes, so decoding never holds the node's GIL.

pocketsphinx's Python binding keeps the GIL while it decodes, and the end of an utterance
(its second passes over the whole utterance) is one call of 50-300 ms: in a thread, that
stalls the node's event loop, every call's audio with it. So decoders live in a few child
processes (``python -m conversation_node.providers.sphinx_worker``), each hosting the
decoders of many streams; the parent talks to one over its stdin/stdout with
length-prefixed msgpack frames, one request and one reply at a time per process (a lock).
The parent's side blocks on the pipe, which releases the GIL: callers run it on threads.

Requests are ``[op, stream_id, arg]``; replies ``[ok, value]`` (``value`` is the error
text when not ok). Ops: ``open`` (arg: lm path, dict path, settings), ``start``,
``feed`` (raw PCM16 bytes), ``hyp``, ``end`` (→ the words of the best path), ``close``,
``cpu`` (→ the child's CPU seconds, for measurement). A new decoder's first utterance is
decoded twice, the second time with the cepstral mean the first taught it (``_Host``).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import IO, Any

import msgpack

__all__ = ["DecoderProxy", "SphinxWorker"]

_HEADER = struct.Struct("<I")
_MAX_FRAME = 16 << 20


class WorkerError(Exception):
    """The worker process failed a request or died."""


def _write(stream: IO[bytes], obj: Any) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    if size > _MAX_FRAME:
        raise WorkerError(f"frame of {size} bytes")
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return msgpack.unpackb(payload, raw=False)


class SphinxWorker:
    """One child process and the lock that serialises requests to it."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "conversation_node.providers.sphinx_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.streams = 0  # open streams placed here (the parent balances on it)

    def placed(self, delta: int) -> None:
        with self._count_lock:
            self.streams += delta

    def call(self, op: str, stream_id: int, arg: Any = None) -> Any:
        stdin, stdout = self._proc.stdin, self._proc.stdout
        if stdin is None or stdout is None:
            raise WorkerError("worker has no pipes")
        with self._lock:
            try:
                _write(stdin, [op, stream_id, arg])
                ok, value = _read(stdout)
            except (OSError, EOFError, ValueError) as exc:
                raise WorkerError(f"worker process lost: {exc!r}") from exc
        if not ok:
            raise WorkerError(str(value))
        return value

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self, timeout_s: float = 5.0) -> None:
        """End the process (closing its stdin ends its loop); kill it if it lingers."""
        with self._lock:
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except OSError:  # a dead process's pipe: nothing was left to flush anyway
                    pass
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()


class DecoderProxy:
    """A stream's decoder in a worker process (blocking calls: use from a thread)."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, worker: SphinxWorker, lm: str, dictionary: str, settings: dict) -> None:
        self.worker = worker
        self.id = next(self._ids)
        worker.call("open", self.id, [lm, dictionary, settings])
        worker.placed(1)

    def start_utt(self) -> None:
        self.worker.call("start", self.id)

    def process_raw(self, pcm: bytes) -> None:
        self.worker.call("feed", self.id, pcm)

    def hyp(self) -> str:
        return str(self.worker.call("hyp", self.id))

    def end_utt(self) -> list[str]:
        """End the utterance; the best hypothesis as dictionary entries, fillers included."""
        return [str(w) for w in self.worker.call("end", self.id)]

    def close(self) -> None:
        self.worker.placed(-1)
        self.worker.call("close", self.id)


# ---------------------------------------------------------------- the child process


# A new decoder's first utterance is heard with the library's initial cepstral mean, far
# from any real voice's: measured on eSpeak speech, "my name is Sarah Johnson" came out as
# "the is Sarah Johnson" the first time and right once the mean had been learned (at the
# end of an utterance). So that utterance is decoded again, with the mean it taught;
# longer than this, it is left as heard (its own updates of the mean suffice then).
_RELEARN_MAX_BYTES = 20 * 16000 * 2  # 20 s of 16 kHz pcm16
# Idle decoders kept for reuse, over all models: a node serving many tenants has a model
# per tenant, and idle decoders of models no longer used (a tenant dropped, a knowledge
# base rebuilt) must not pile up. The least recently used model's go first.
_IDLE_MAX = 32


class _Host:
    """The child's side: decoders by stream id, idle ones kept per model for reuse."""

    def __init__(self) -> None:
        self.decoders: dict[int, tuple[tuple[str, str], Any]] = {}
        self.idle: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        # The audio of the utterance in progress on a decoder that never finished one.
        self.first_utterance: dict[int, bytearray] = {}
        self.learned: set[int] = set()  # id() of decoders whose mean came from speech

    def handle(self, op: str, stream_id: int, arg: Any) -> Any:
        if op == "open":
            lm, dictionary, settings = arg
            key = (lm, dictionary)
            idle = self.idle.get(key)
            if idle:
                decoder = idle.pop()
                if not idle:
                    del self.idle[key]
            else:
                from pocketsphinx import Decoder

                decoder = Decoder(lm=lm, dict=dictionary, **settings)
            self.decoders[stream_id] = (key, decoder)
            return None
        if op == "cpu":
            return time.process_time()
        key, decoder = self.decoders[stream_id]
        if op == "feed":
            decoder.process_raw(arg)
            heard = self.first_utterance.get(stream_id)
            if heard is not None:
                heard += arg
                if len(heard) > _RELEARN_MAX_BYTES:
                    del self.first_utterance[stream_id]
            return None
        if op == "start":
            decoder.start_utt()
            if id(decoder) not in self.learned:
                self.first_utterance[stream_id] = bytearray()
            return None
        if op == "hyp":
            hyp = decoder.hyp()
            return hyp.hypstr if hyp is not None else ""
        if op == "end":
            decoder.end_utt()
            self.learned.add(id(decoder))
            again = self.first_utterance.pop(stream_id, None)
            if again:
                decoder.start_utt()
                decoder.process_raw(bytes(again))
                decoder.end_utt()
            return [s.word for s in decoder.seg()]
        if op == "close":  # the parent ended any utterance in progress first
            del self.decoders[stream_id]
            self.first_utterance.pop(stream_id, None)
            self.idle.setdefault(key, []).append(decoder)
            self.idle.move_to_end(key)
            self._trim_idle()
            return None
        raise ValueError(f"unknown op {op!r}")

    def _trim_idle(self) -> None:
        while sum(len(idle) for idle in self.idle.values()) > _IDLE_MAX:
            key, idle = next(iter(self.idle.items()))
            dropped = idle.pop(0)
            if not idle:
                del self.idle[key]
            self.learned.discard(id(dropped))  # its id() may come back with a new decoder


def main() -> int:
    host, stdin, stdout = _Host(), sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            op, stream_id, arg = _read(stdin)
        except EOFError:
            return 0
        try:
            reply = [True, host.handle(op, stream_id, arg)]
        except Exception as exc:  # reported to the parent, which fails that stream only
            reply = [False, f"{type(exc).__name__}: {exc}"]
        _write(stdout, reply)


if __name__ == "__main__":
    sys.exit(main())
