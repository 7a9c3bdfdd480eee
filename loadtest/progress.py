"""The live progress display of a load run: calls up, turns a second, p99 so far, errors
and the last fault, redrawn twice a second on stderr.

Off when stderr is not a terminal (a log file or CI keeps only the final report) or with
``--no-progress``. Reads a :class:`~loadtest.timeline.Timeline`; never writes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from loadtest.timeline import Timeline

REFRESH_S = 0.5


def add_progress_flag(parser: Any) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no live display on stderr (off if not a TTY)"
    )


def progress_wanted(no_progress: bool, stream: IO[str] | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return not no_progress and stream.isatty()


def render(timeline: Timeline, title: str, total_turns: int | None = None) -> RenderableType:
    """One frame of the display (pure: a test can render it to text)."""
    elapsed = timeline.elapsed_s()
    head = Table.grid(padding=(0, 1))
    head.add_row(
        Text(title, style="bold"),
        ProgressBar(total=float(total_turns), completed=float(timeline.turns), width=36)
        if total_turns
        else Text(""),
        Text(f"{timeline.turns:,}" + (f"/{total_turns:,}" if total_turns else "") + " turns"),
        Text(f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}", style="dim"),
    )
    errors_style = "bold red" if timeline.errors else "green"
    line = Text.assemble(
        ("calls up ", "dim"),
        (f"{timeline.calls_up:,}", "bold"),
        ("  turns/s ", "dim"),
        (f"{timeline.turns_per_s():.1f}", "bold"),
        ("  p99 so far ", "dim"),
        (f"{timeline.latency_p(99):.0f} ms", "bold"),
        ("  errors ", "dim"),
        (f"{timeline.errors:,}", errors_style),
    )
    fault = timeline.last_fault()
    if fault is None:
        return Group(head, line)
    # Text objects are never parsed as markup, so a node name cannot restyle the line.
    last = Text(f"last fault +{fault.t_s:.1f}s {fault.kind} {fault.target}", style="red")
    return Group(head, line, last)


class LiveProgress:
    """``async with LiveProgress(timeline, "run", total_turns=..., enabled=...)``: owns the
    redraw task and the terminal while the run lasts."""

    def __init__(
        self,
        timeline: Timeline,
        title: str,
        *,
        total_turns: int | None = None,
        enabled: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self.timeline = timeline
        self.title = title
        self.total_turns = total_turns
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None

    def frame(self) -> RenderableType:
        return render(self.timeline, self.title, self.total_turns)

    async def _redraw(self) -> None:
        while self._live is not None:
            self._live.update(self.frame(), refresh=True)
            await asyncio.sleep(REFRESH_S)

    async def __aenter__(self) -> LiveProgress:
        if self.enabled:
            console = Console(file=self._stream)
            self._live = Live(self.frame(), console=console, auto_refresh=False, transient=False)
            self._live.start()
            self._task = asyncio.create_task(self._redraw(), name="loadtest-progress")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        live, self._live = self._live, None
        if live is not None:
            live.update(self.frame(), refresh=True)  # the final state stays on screen
            live.stop()
