"""The shared core of every callmesh process: the wire protocol (:mod:`.protocol`), the
router <-> node link (:mod:`.mux`), configuration (:mod:`.config`), telemetry types and
metric names (:mod:`.telemetry`, :mod:`.metric_names`), audio formats, the G.711 codec and
the simulated speech signal (:mod:`.audio`), and running a service process (:mod:`.runner`).

It imports nothing above it (the import-linter contracts in pyproject.toml hold that);
``python -m callmesh`` (:mod:`.__main__`) is the one, named exception.
"""
