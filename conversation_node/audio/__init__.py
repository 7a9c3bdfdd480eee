"""Telephony audio utilities: G.711 mu-law, PCM16 resampling, voice activity detection."""

from conversation_node.audio.codec import (
    MULAW_SILENCE,
    Downsampler,
    array_to_pcm16,
    mulaw_decode,
    mulaw_decode_array,
    mulaw_encode,
    mulaw_encode_array,
    pcm16_to_array,
)
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEvent, VadEventKind

__all__ = [
    "MULAW_SILENCE",
    "Downsampler",
    "EnergyVAD",
    "VadConfig",
    "VadEvent",
    "VadEventKind",
    "array_to_pcm16",
    "mulaw_decode",
    "mulaw_decode_array",
    "mulaw_encode",
    "mulaw_encode_array",
    "pcm16_to_array",
]
