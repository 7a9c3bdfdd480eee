"""A cluster of real processes on one machine: embedded Redis and NATS
(:mod:`localcluster.servers`), a router and conversation nodes (:mod:`localcluster.cluster`).

Used by ``callmesh up``, the tests and the benchmarks. It starts processes (``python -m
callmesh``) and imports none of them.
"""
