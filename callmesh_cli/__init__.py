"""The ``callmesh`` command (``callmesh_cli.cli``): the top floor, above every process it runs.

Nothing in the cluster imports this package; see the layering contracts in pyproject.toml.
"""
