"""Time to first audio as the browser console hears it, and what a spoken call costs a node.

A local cluster like ``callmesh up``'s (a router and two nodes, development mode, offline
speech: pocketsphinx with Silero VAD endpointing, eSpeak NG, the simulated language model
at its default latency) and headless Chromium on the console page, whose fake microphone
plays a scripted booking conversation spoken by the eSpeak NG provider. Each call is a
fresh browser; calls run one after another.

Per turn, from the page (``window.callmeshConsole``):

* ``heard_ms``: from the caller's end of speech (the last microphone frame above the
  page's voice level) to the moment the reply's first audio starts to play (its
  scheduled start on the page's clock): network, router, node, endpointing and playback
  scheduling included;
* ``node_ms``: the node's own figure (``turn_metrics.latency_ms``: from the end of speech
  its recognizer saw to the first audio it sent), and its stages.

CPU: utime + stime of every node process and of its children (the recognizer's decoding
processes) over each call, less the nodes' idle rate measured before the first call; per
second of call, that is the share of a core one spoken call keeps busy.

    python bench/console_ttfa.py [--calls 3] [--speech offline|simulated] [--json PATH]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `python bench/console_ttfa.py`
    sys.path.insert(0, str(REPO))

from bench.console_page import (  # noqa: E402
    RATE,
    Line,
    Speech,
    console_browser,
    conversation,
    espeak_voice,
    why_no_browser,
    why_no_offline_speech,
    write_wav,
)
from loadtest.capacity import cpu_seconds  # noqa: E402
from loadtest.stats import (  # noqa: E402
    git_commit,
    machine_info,
    percentiles,
    utc_now,
    write_report,
)
from localcluster.cluster import LocalCluster  # noqa: E402

# A booking, then a question and a goodbye. Each reply gets 8 s before the next sentence
# (the longest, the read-back of the booking, is about 4.5 s of speech), so turns stay
# apart and nobody talks over the agent. No commas: eSpeak pauses at them, and a pause
# would end the utterance early.
SCRIPT = [
    Line(5.5, "My name is Sarah Johnson."),
    Line(8.0, "I would like to book a cleaning."),
    Line(8.0, "Can I come in on Tuesday at 3 pm?"),
    Line(8.0, "Yes please book it."),
    Line(8.0, "How much does a filling cost?"),
    Line(8.0, "Thank you goodbye."),
    Line(8.0, ""),
]
IDLE_S = 10.0


def _tones() -> Speech:
    from callmesh.audio.tones import tones_for_text

    return lambda text: tones_for_text(text, RATE)


def _children(pids: set[int]) -> set[int]:
    """The live processes whose parent is in ``pids``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) in pids:
            found.add(int(stat.parent.name))
    return found


def _cpu(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds so far of the nodes' own processes and of their children."""
    nodes = {n.pid for n in cluster.nodes if n.alive()}

    def total(pids: set[int]) -> float:
        seconds = 0.0
        for pid in pids:
            try:
                seconds += cpu_seconds(pid)
            except (OSError, ValueError):
                pass  # exited between the listing and the read
        return seconds

    return {"node": total(nodes), "decoders": total(_children(nodes))}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def one_call(cluster: LocalCluster, wav: Path, talk_s: float, work: Path) -> dict[str, Any]:
    """One call through a fresh browser: its turns as the page saw them, and its CPU."""
    with console_browser(work / "profile", wav) as (page, errors):
        page.goto(cluster.console_url)
        page.wait_for_selector("#mode-badge.dev")
        cpu0, t0 = _cpu(cluster), time.monotonic()
        page.click("#start-btn")
        page.wait_for_function("() => window.callmeshConsole.owner !== null", timeout=30_000)
        time.sleep(talk_s)  # the conversation plays out: the microphone follows the WAV
        state = page.evaluate(
            """() => { const c = window.callmeshConsole;
                 return { heard: Object.fromEntries(c.heard), metrics: c.metrics,
                          stats: c.stats, callId: c.callId,
                          owners: c.owners.map((o) => [o.node, o.epoch, o.reason]) }; }"""
        )
        shown = conversation(page)
        page.click("#hangup-btn")
        page.wait_for_selector("#conn.ended", timeout=15_000)
        cpu, wall = _delta(_cpu(cluster), cpu0), time.monotonic() - t0
        if errors:
            raise RuntimeError(f"JavaScript errors on the page: {errors}")
    heard = {int(turn): ms for turn, ms in state["heard"].items()}
    turns = []
    for m in state["metrics"]:
        if m["turn"] < 1 or not m.get("spoke"):
            continue
        turns.append(
            {
                "turn": m["turn"],
                "heard_ms": round(heard[m["turn"]], 1) if m["turn"] in heard else None,
                "node_ms": m["latency_ms"],
                "stt_ms": m["stt_ms"],
                "llm_ms": m["llm_first_sentence_ms"],
                "tts_ms": m["tts_first_chunk_ms"],
                "callmesh_ms": m["overhead_ms"],
                "intent": m["intent"],
            }
        )
    return {
        "call_id": state["callId"],
        "seconds": round(wall, 2),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "turns": turns,
        "heard_said": [m["text"] for m in shown if m["who"] == "user" and m["final"]],
        "stats": state["stats"],
        "owners": state["owners"],
    }


def run(calls: int, speech: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="console-ttfa-"))
    wav = work / "mic.wav"
    spans = write_wav(wav, SCRIPT, espeak_voice() if speech == "offline" else _tones())
    talk_s = spans[-1][1] + 6.0  # the last sentence's end, and its reply
    with LocalCluster(nodes=2, dev=True, speech=speech) as cluster:
        cpu0 = _cpu(cluster)
        time.sleep(IDLE_S)
        idle = {k: v / IDLE_S for k, v in _delta(_cpu(cluster), cpu0).items()}
        results = [one_call(cluster, wav, talk_s, work / f"call-{i}") for i in range(calls)]
    turns = [t for r in results for t in r["turns"]]
    heard = [t["heard_ms"] for t in turns if t["heard_ms"] is not None]
    busy = {
        part: [(r["cpu_s"][part] - idle[part] * r["seconds"]) / r["seconds"] for r in results]
        for part in ("node", "decoders")
    }
    return {
        "benchmark": "console_ttfa",
        "command": "python bench/console_ttfa.py " + shlex.join(sys.argv[1:]),
        "date": utc_now(),
        "machine": machine_info(),
        "commit": git_commit(),
        "speech": speech,
        "calls": calls,
        "sentences": [line.text for line in SCRIPT if line.text],
        "turns": len(turns),
        "heard_ms": percentiles(heard),
        # The first reply of a fresh cluster: the node's first recognizer stream starts
        # its decoding process and builds the language model, its first utterance is
        # decoded twice (sphinx_worker.py).
        "first_turn_heard_ms": turns[0]["heard_ms"] if turns else None,
        "heard_ms_after_first_turn": percentiles(heard[1:]),
        # Owner changes with no node killed: there should be none.
        "failovers": sum(len(r["owners"]) - 1 for r in results),
        "node_ms": percentiles([t["node_ms"] for t in turns]),
        "stages_ms_p50": {
            stage: percentiles([t[f"{stage}_ms"] for t in turns])["p50"]
            for stage in ("stt", "llm", "tts", "callmesh")
        },
        "idle_cores": {k: round(v, 4) for k, v in idle.items()},
        "cores_per_call": {
            part: round(sum(values) / len(values), 4) for part, values in busy.items()
        },
        "per_call": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="calls, one after another")
    parser.add_argument("--speech", choices=("offline", "simulated"), default="offline")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    missing = why_no_browser() or (why_no_offline_speech() if args.speech == "offline" else "")
    if missing:
        print(f"console_ttfa: {missing}", file=sys.stderr)
        return 2
    write_report(run(args.calls, args.speech), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
