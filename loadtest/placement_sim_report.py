"""What the placement simulation prints and measures outside the simulation itself:
a progress bar, an SVG of load over time, and the pins' memory in a real Redis."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Callable[[int], None]]:
    with tqdm(total=total, desc="calls placed", unit="call", file=sys.stderr) as bar:
        yield bar.update


def pins_in_redis(sample: int, live_calls: int) -> dict[str, Any]:
    """Write ``sample`` pins as the router does (key, node id, TTL) into a fresh
    Redis-compatible server and scale the memory they took to ``live_calls``."""
    import redis

    from localcluster.servers import ServerError, redis_server
    from state_store import keys

    with tempfile.TemporaryDirectory(prefix="callmesh-sim-") as tmp:
        try:
            server = redis_server(Path(tmp))
            server.start()
        except (ServerError, OSError) as exc:
            return {"skipped": f"no Redis-compatible server could start: {exc}"}
        try:
            client = redis.Redis.from_url(server.url)
            before = int(client.info("memory")["used_memory"])
            pipe = client.pipeline(transaction=False)
            for i in range(sample):
                pipe.set(keys.pin("demo", f"call-{i:07d}"), f"node-{i % 1000:05d}", ex=6 * 3600)
                if i % 1000 == 999:
                    pipe.execute()
            pipe.execute()
            after = int(client.info("memory")["used_memory"])
            client.close()
        finally:
            server.stop()
    per_pin = (after - before) / sample
    return {
        "sample_pins": sample,
        "bytes_per_pin": round(per_pin, 1),
        "live_calls": live_calls,
        "pins_mib_at_peak": round(per_pin * live_calls / 2**20, 1),
    }


def write_svg(report: dict[str, Any], path: str) -> None:
    """Max load over mean, bounded loads vs a plain ring, with the cluster events marked."""
    w, h, pad = 760, 320, 48
    runs = {"bounded": "#1f77b4", "plain": "#d62728"}
    series = {
        name: [
            (s["t_s"], s["max"] / s["mean"]) for s in report[name]["load_samples"] if s["mean"] >= 1
        ]
        for name in runs
    }
    t_max = max((t for pts in series.values() for t, _ in pts), default=1.0) or 1.0
    r_max = max((r for pts in series.values() for _, r in pts), default=2.0)
    r_max = max(2.0, r_max * 1.1)

    def x(t: float) -> float:
        return pad + (w - 2 * pad) * t / t_max

    def y(r: float) -> float:
        return h - pad - (h - 2 * pad) * (r - 1.0) / (r_max - 1.0)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{pad}" y="18" font-size="13">Max node load / mean over the run '
        f"({report['config']['nodes']} nodes, {report['config']['calls']:,} calls)</text>",
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
    ]
    for tick in (1.0, 1.25, 1.5, 2.0, r_max):
        if tick <= r_max:
            out.append(
                f'<text x="4" y="{y(tick) + 4:.0f}">{tick:.2f}</text>'
                f'<line x1="{pad}" y1="{y(tick):.1f}" x2="{w - pad}" y2="{y(tick):.1f}" '
                'stroke="#eee"/>'
            )
    for e in report["bounded"]["events"]:
        ex = x(e["t_s"])
        out.append(
            f'<line x1="{ex:.1f}" y1="{pad}" x2="{ex:.1f}" y2="{h - pad}" '
            'stroke="#999" stroke-dasharray="4 3"/>'
            f'<text x="{ex + 3:.1f}" y="{pad + 10}" fill="#555">{e["kind"]}</text>'
        )
    for i, (name, colour) in enumerate(runs.items()):
        pts = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in series[name])
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out.append(
            f'<text x="{w - pad - 160}" y="{pad + 30 + 14 * i}" fill="{colour}">'
            f"{'bounded loads' if name == 'bounded' else 'plain ring'}</text>"
        )
    out.append(f'<text x="{w / 2 - 40:.0f}" y="{h - 12}">simulated time, s</text>')
    out.append("</svg>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(out) + "\n")
    print(f"plot written to {path}", file=sys.stderr)
