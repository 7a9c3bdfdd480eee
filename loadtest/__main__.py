"""``python -m loadtest SCENARIO ...``: load, chaos, capacity and memory benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys

from callmesh.runner import install_uvloop
from callmesh.telemetry import setup_logging

# Each scenario module exposes add_parser(subparsers); a missing one is simply not offered.
SCENARIOS = [
    "loadtest.run",
    "loadtest.chaos",
    "loadtest.memory_bench",
    "loadtest.effects_bench",
    "loadtest.capacity",
    "loadtest.placement_sim",
    "loadtest.soak",
    "loadtest.abuse",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name in SCENARIOS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    setup_logging("WARNING", json_logs=False)
    install_uvloop()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
