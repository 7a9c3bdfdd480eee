"""Clients of a callmesh router: the text client (:mod:`callmesh_client.client`) and the
simulated voice caller (:mod:`callmesh_client.voice_client`, Twilio Media Streams or native).

They speak to callmesh over the wire only: nothing here imports the router, the nodes or
their stores (a contract in pyproject.toml holds that).
"""
