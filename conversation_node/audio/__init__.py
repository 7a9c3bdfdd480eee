"""The node's audio: voice activity detection (:mod:`.vad`) and converting a voice's audio
into the format a call declared (:mod:`.convert`). Formats, the G.711 codec and resampling
are shared with every process: :mod:`callmesh.audio`.

Nothing here imports the providers; the providers import this.
"""

from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEvent, VadEventKind

__all__ = ["EnergyVAD", "VadConfig", "VadEvent", "VadEventKind"]
