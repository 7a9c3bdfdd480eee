"""One call's speculative replies as tasks: the I/O around the decisions of
:class:`conversation_node.preemptive.Speculator`.

A speculation is started in a task of its own (``Starter``: the turn runner's
``speculate``, which builds the turn's request without changing the call and starts the
model); at most one is in flight. A dropped one is stopped in a task of its own too (the
recognizer's reader never waits for it), counted once as cancelled with what its model
wrote; one still building its request is cancelled before its model starts. The one in
flight when the final transcript matches is handed to the turn, which adopts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from callmesh.metric_names import PREEMPTIVE_CANCELLED, PREEMPTIVE_STARTED
from conversation_node.model_reply import PreparedReply
from conversation_node.preemptive import (
    Decision,
    Outcome,
    SpeculationConfig,
    Speculator,
    normalise,
)
from conversation_node.providers.base import LLMRequest
from conversation_node.turn_close import Counters
from memory.retrieval import RetrievalResult

log = logging.getLogger("callmesh.node.voice")


@dataclass
class Speculation:
    """A reply started before its turn was confirmed (the turn runner's ``speculate``):
    for turn ``turn``, on ``retrieval``; ``outcome`` says what became of it."""

    turn: int
    retrieval: RetrievalResult
    reply: PreparedReply
    outcome: Outcome = Outcome.NONE  # not decided yet


def same_request(a: LLMRequest, b: LLMRequest) -> bool:
    """The same model request but for how the caller's words are written (case,
    punctuation, spacing): a reply started on ``a`` is a reply to ``b``."""

    def key(r: LLMRequest) -> LLMRequest:
        said, norm = r.user_text, normalise(r.user_text)
        messages = [
            {k: (v.replace(said, norm) if isinstance(v, str) and said else v) for k, v in m.items()}
            for m in r.messages
        ]
        return replace(r, messages=messages, user_text=norm)

    return key(a) == key(b)


Starter = Callable[[str], Coroutine[Any, Any, Speculation]]
Dropper = Callable[[Speculation], Awaitable[None]]
Task = asyncio.Task[Speculation]


class Speculations:
    def __init__(
        self,
        config: SpeculationConfig | None,
        *,
        start: Starter,
        drop: Dropper,
        counters: Counters,
        name: str,
    ) -> None:
        self.decide = Speculator(config)
        self._start = start
        self._drop_one = drop
        self._counters = counters
        self._name = name
        self._task: asyncio.Task[Speculation] | None = None
        self._dropping: set[asyncio.Task[None]] = set()

    def on_stable(self, text: str, *, busy: bool) -> None:
        """The words so far are stable: maybe start the reply to them now."""
        decision = self.decide.on_stable(text, busy=busy)
        if decision is Decision.CANCEL:
            self._drop()
            decision = self.decide.on_stable(text, busy=busy)
        if decision is Decision.START:
            self._counters.inc(PREEMPTIVE_STARTED)
            self._task = asyncio.create_task(self._start(text), name=f"speculate:{self._name}")

    def on_interim(self, text: str) -> None:
        if self.decide.on_speech_resumed(text) is Decision.CANCEL:
            self._drop()  # the caller went on: the guess is stale

    def on_final(self, text: str, *, answer: bool) -> tuple[Task | None, Outcome]:
        """The utterance ended with ``text``. With ``answer`` (a turn will answer it): the
        speculation to adopt, if one matches, and what to report; otherwise any in
        flight is dropped."""
        decision = self.decide.on_final(text)
        outcome = self.decide.outcome(decision)
        if decision is Decision.ADOPT and answer:
            task, self._task = self._task, None
            return task, outcome
        self._drop()
        return None, outcome

    def abandon(self) -> None:
        """The call is ending: drop what is in flight."""
        if self.decide.abandon() is Decision.CANCEL:
            self._drop()

    @property
    def dropping(self) -> set[asyncio.Task[None]]:
        return self._dropping

    def _drop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        dropping = asyncio.create_task(self._stop(task), name=f"drop:{self._name}")
        self._dropping.add(dropping)
        dropping.add_done_callback(self._dropping.discard)

    async def _stop(self, task: asyncio.Task[Speculation]) -> None:
        if not task.done():
            task.cancel()  # still building its request: the model is never started
        speculation = await started(task)
        if speculation is not None:
            await self._drop_one(speculation)
        else:
            self._counters.inc(PREEMPTIVE_CANCELLED)


async def started(task: asyncio.Task[Speculation]) -> Speculation | None:
    """The speculative reply ``task`` started; None if it could not start (it failed, or
    was cancelled): the turn then answers as if there had been none. Cancelling the
    caller cancels ``task`` too, so no model is left running for nobody."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                speculation = await task
                await speculation.reply.cancel()
            raise
        return None
    except Exception:
        log.warning("speculative reply failed to start", exc_info=True)
        return None
