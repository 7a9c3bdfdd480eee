"""The faults of a ``loadtest chaos`` run and when each strikes: ``--fault`` specs, parsed
and scheduled without I/O (:mod:`loadtest.fault_injector` strikes them).

A spec is ``KIND[:ARG]@WHEN[+DURATION][/EVERY[xTIMES]]``:

- ``WHEN``: a share of all turns done (``40%``, as the classic flags strike) or a time
  since the callers started (``12s``, ``500ms``, ``2m``);
- ``+DURATION``: how long a window fault lasts (outages, slow model, link latency);
- ``/EVERY``: strike again every so often, in the unit of ``WHEN`` (``@20%/20%``: at 20,
  40, 60 and 80 %; ``@10s/30s``: at 10, 40, 70 s ... while calls last), at most ``TIMES``
  times with ``xTIMES`` (``@10s/30sx3``).

Kinds, their ``ARG`` and default duration:

=================  =========================================  ==================
``node-kill``      how many nodes (the busiest; 1) or a name  instant (SIGKILL)
``node-drain``     same                                       instant (SIGTERM)
``router-kill``    how many routers (the busiest; 1)          instant, once
``router-drain``   same                                       instant, once
``redis-restart``  ``term`` (default) or ``kill`` (SIGKILL)    down 0 s, then up
``nats-outage``    --                                         5 s
``crm-outage``     ``503`` (default) or ``abort``             10 s
``llm-slow``       extra model latency (``2s``)               10 s
``link-latency``   ``DELAY[~JITTER]`` router<->nodes (50ms~20ms)  10 s
=================  =========================================  ==================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

MAX_SPEC_CHARS = 200
MAX_FAULTS = 20  # --fault options in one run
MAX_TIMES = 100  # occurrences of one spec
MAX_AT_S = 3600.0
MAX_DURATION_S = 600.0
MAX_LLM_EXTRA_S = 60.0
MAX_LINK_DELAY_S = 5.0
MAX_TARGET_COUNT = 100


class FaultSpecError(ValueError):
    """A ``--fault`` spec that cannot be run, with what is wrong in words."""


class Kind(StrEnum):
    NODE_KILL = "node-kill"
    NODE_DRAIN = "node-drain"
    ROUTER_KILL = "router-kill"
    ROUTER_DRAIN = "router-drain"
    REDIS_RESTART = "redis-restart"
    NATS_OUTAGE = "nats-outage"
    CRM_OUTAGE = "crm-outage"
    LLM_SLOW = "llm-slow"
    LINK_LATENCY = "link-latency"


NODE_KINDS = (Kind.NODE_KILL, Kind.NODE_DRAIN)
ROUTER_KINDS = (Kind.ROUTER_KILL, Kind.ROUTER_DRAIN)
INSTANT_KINDS = (*NODE_KINDS, *ROUTER_KINDS)
DEFAULT_DURATION_S = {
    Kind.REDIS_RESTART: 0.0,
    Kind.NATS_OUTAGE: 5.0,
    Kind.CRM_OUTAGE: 10.0,
    Kind.LLM_SLOW: 10.0,
    Kind.LINK_LATENCY: 10.0,
}
CRM_MODES = ("503", "abort")

_SPEC = re.compile(
    r"(?P<kind>[a-z-]+)(?::(?P<arg>[^@]*))?@(?P<when>[^+/]+)"
    r"(?:\+(?P<duration>[^/]+))?(?:/(?P<every>[^x]+)(?:x(?P<times>\d+))?)?"
)
_AMOUNT = re.compile(r"([0-9]*\.?[0-9]+)(ms|s|m|%)?")
_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class When:
    """A moment of the run: ``share`` of all turns done (0..1), or ``seconds`` since the
    callers started; exactly one is set."""

    share: float | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.share * 100:g}%" if self.share is not None else f"{self.seconds:g}s"


@dataclass(frozen=True)
class FaultSpec:
    """One ``--fault``: what, to whom, when, for how long, how often."""

    kind: Kind
    at: When
    duration_s: float = 0.0
    every: When | None = None
    times: int = 1
    count: int = 1  # node/router faults: how many of the busiest
    target: str = ""  # node/router faults: a name instead of the busiest
    crm_mode: str = "503"
    hard: bool = False  # redis-restart: SIGKILL, not SIGTERM
    extra_s: float = 0.0  # llm-slow: added to the model's first token
    delay_s: float = 0.0  # link-latency: delay each way
    jitter_s: float = 0.0  # link-latency: +- this, uniformly, order kept
    text: str = field(default="", compare=False)

    @property
    def window(self) -> bool:
        """A fault that starts and, ``duration_s`` later, ends."""
        return self.kind not in INSTANT_KINDS

    def moments(self) -> list[When]:
        """Every moment this spec strikes at (a repeat in seconds has no end of its own:
        :data:`MAX_TIMES` bounds it, the end of the calls ends it)."""
        if self.every is None:
            return [self.at]
        out = []
        for n in range(self.times):
            if self.at.share is not None and self.every.share is not None:
                share = self.at.share + n * self.every.share
                if share >= 1.0:
                    break
                out.append(When(share=round(share, 9)))
            elif self.at.seconds is not None and self.every.seconds is not None:
                out.append(When(seconds=round(self.at.seconds + n * self.every.seconds, 6)))
        return out


def _amount(text: str, what: str, *, percent: bool = False) -> When:
    m = _AMOUNT.fullmatch(text.strip())
    unit = m[2] if m else None
    if m is None or (unit == "%" and not percent):
        units = "a share of turns (40%) or a time (12s, 500ms, 2m)" if percent else "a time"
        raise FaultSpecError(f"{what} {text!r} is not {units}")
    value = float(m[1])
    if unit == "%":
        if not 0 < value < 100:
            raise FaultSpecError(f"{what} {text!r}: a share of turns is between 0% and 100%")
        return When(share=value / 100)
    return When(seconds=value * _UNIT_S[unit or "s"])


def _seconds(text: str, what: str, bound: float) -> float:
    s = _amount(text, what).seconds
    if s is None or s > bound:
        raise FaultSpecError(f"{what} {text!r} is above {bound:g}s")
    return s


def _apply_arg(kind: Kind, arg: str | None, fields: dict[str, object]) -> None:
    if arg is None:
        return
    if kind in INSTANT_KINDS:
        if arg.isdigit():
            count = int(arg)
            if not 1 <= count <= MAX_TARGET_COUNT:
                raise FaultSpecError(f"{kind}: count {arg} is not in 1..{MAX_TARGET_COUNT}")
            fields["count"] = count
        elif _NAME.fullmatch(arg) and len(arg) <= 40 and kind in NODE_KINDS:
            fields["target"] = arg
        else:
            names = "a count or a node name (node-2)" if kind in NODE_KINDS else "a count"
            raise FaultSpecError(f"{kind}: {arg!r} is not {names}")
    elif kind is Kind.REDIS_RESTART:
        if arg not in ("term", "kill"):
            raise FaultSpecError(f"redis-restart: {arg!r} is not term or kill")
        fields["hard"] = arg == "kill"
    elif kind is Kind.CRM_OUTAGE:
        if arg not in CRM_MODES:
            raise FaultSpecError(f"crm-outage: mode {arg!r} is not one of {', '.join(CRM_MODES)}")
        fields["crm_mode"] = arg
    elif kind is Kind.LLM_SLOW:
        fields["extra_s"] = _seconds(arg, "llm-slow: extra latency", MAX_LLM_EXTRA_S)
    elif kind is Kind.LINK_LATENCY:
        delay, _, jitter = arg.partition("~")
        fields["delay_s"] = _seconds(delay, "link-latency: delay", MAX_LINK_DELAY_S)
        fields["jitter_s"] = (
            _seconds(jitter, "link-latency: jitter", MAX_LINK_DELAY_S) if (jitter) else 0.0
        )
    else:
        raise FaultSpecError(f"{kind} takes no argument (got {arg!r})")


def parse_fault(text: str) -> FaultSpec:
    """A ``--fault`` spec, checked; :class:`FaultSpecError` says what is wrong."""
    if len(text) > MAX_SPEC_CHARS:
        raise FaultSpecError(f"fault spec longer than {MAX_SPEC_CHARS} characters")
    m = _SPEC.fullmatch(text.strip())
    if m is None:
        raise FaultSpecError(
            f"{text!r} is not KIND[:ARG]@WHEN[+DURATION][/EVERY[xTIMES]] (e.g. node-kill@40%, "
            "nats-outage@10s+5s, link-latency:80ms~30ms@20%+10s/30%)"
        )
    try:
        kind = Kind(m["kind"])
    except ValueError:
        kinds = ", ".join(k.value for k in Kind)
        raise FaultSpecError(f"unknown fault {m['kind']!r}; known: {kinds}") from None
    at = _amount(m["when"], f"{kind}: when", percent=True)
    if at.seconds is not None and at.seconds > MAX_AT_S:
        raise FaultSpecError(f"{kind}: when {m['when']!r} is above {MAX_AT_S:g}s")
    fields: dict[str, object] = {
        "extra_s": 2.0,
        "delay_s": 0.05,
        "jitter_s": 0.02,
        "duration_s": DEFAULT_DURATION_S.get(kind, 0.0),
    }
    _apply_arg(kind, m["arg"], fields)
    if m["duration"] is not None:
        if kind in INSTANT_KINDS:
            raise FaultSpecError(f"{kind} is instant: it takes no +DURATION")
        fields["duration_s"] = _seconds(m["duration"], f"{kind}: duration", MAX_DURATION_S)
    if (
        kind in (Kind.NATS_OUTAGE, Kind.CRM_OUTAGE, Kind.LLM_SLOW, Kind.LINK_LATENCY)
        and not (fields["duration_s"])
    ):
        raise FaultSpecError(f"{kind}: a window of 0 s is no fault")
    every = None
    times = 1
    if m["every"] is not None:
        if kind in ROUTER_KINDS:
            raise FaultSpecError(f"{kind} strikes once: it takes no /EVERY")
        every = _amount(m["every"], f"{kind}: every", percent=True)
        if (every.share is None) != (at.share is None):
            raise FaultSpecError(f"{kind}: /EVERY must be in the unit of @WHEN (% or time)")
        if every.seconds is not None and every.seconds < 1.0:
            raise FaultSpecError(f"{kind}: /EVERY is at least 1s")
        if (
            every.seconds is not None and float(fields["duration_s"]) >= every.seconds  # type: ignore[arg-type]
        ):
            raise FaultSpecError(f"{kind}: the window must be shorter than /EVERY")
        times = int(m["times"]) if m["times"] is not None else MAX_TIMES
        if not 1 <= times <= MAX_TIMES:
            raise FaultSpecError(f"{kind}: xTIMES is not in 1..{MAX_TIMES}")
    elif m["times"] is not None:
        raise FaultSpecError(f"{kind}: xTIMES needs /EVERY")
    return FaultSpec(kind, at, every=every, times=times, text=text.strip(), **fields)  # type: ignore[arg-type]


def parse_faults(texts: list[str]) -> list[FaultSpec]:
    """Every ``--fault`` of a run, checked together."""
    if len(texts) > MAX_FAULTS:
        raise FaultSpecError(f"at most {MAX_FAULTS} --fault options")
    specs = [parse_fault(t) for t in texts]
    if sum(1 for s in specs if s.kind in ROUTER_KINDS) > 1:
        raise FaultSpecError("one router fault a run (router-kill or router-drain)")
    return specs


@dataclass(frozen=True)
class Occurrence:
    """The ``n``-th strike of ``spec`` (0-based)."""

    spec: FaultSpec
    n: int
    at: When


class Schedule:
    """Which strikes are due, given how far the run is; each is handed out once."""

    def __init__(self, specs: list[FaultSpec]) -> None:
        self._pending = [
            Occurrence(spec, n, at) for spec in specs for n, at in enumerate(spec.moments())
        ]
        self.total = len(self._pending)

    def due(self, share_done: float, elapsed_s: float) -> list[Occurrence]:
        """The strikes whose moment has come (in the order planned), removed from those
        pending."""
        now = [
            o
            for o in self._pending
            if (o.at.share is not None and share_done >= o.at.share)
            or (o.at.seconds is not None and elapsed_s >= o.at.seconds)
        ]
        self._pending = [o for o in self._pending if o not in now]
        return now

    def missed(self) -> list[Occurrence]:
        """The strikes whose moment never came (the calls ended first)."""
        return list(self._pending)
