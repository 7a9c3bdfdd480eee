"""``python -m callmesh``: the ``callmesh`` command, as processes are spawned (local cluster,
tests, benchmarks). The one import from the shared core upwards, allowed by name in the
layering contract (pyproject.toml): the command lives in :mod:`callmesh_cli`."""

from callmesh_cli.cli import main

raise SystemExit(main())
