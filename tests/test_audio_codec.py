"""G.711 mu-law codec, the 3:1 downsampler and the energy VAD."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from callmesh.audio.codec import (
    Downsampler,
    array_to_pcm16,
    mulaw_decode,
    mulaw_decode_array,
    mulaw_encode,
    mulaw_encode_array,
    pcm16_to_array,
)
from callmesh.audio.format import AudioEncoding
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEvent, VadEventKind

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def reference_lin2ulaw(sample: int) -> int:
    """G.711 mu-law, one sample at a time, as in the Sun reference code (g711.c)."""
    pcm = sample >> 2  # 14-bit
    mask = 0xFF
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    pcm = min(pcm, 32635) + (0x84 >> 2)
    for seg, end in enumerate((0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)):
        if pcm <= end:
            return ((seg << 4) | ((pcm >> (seg + 1)) & 0xF)) ^ mask
    return 0x7F ^ mask


def reference_ulaw2lin(code: int) -> int:
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


def test_mulaw_encode_is_bit_exact_for_every_int16() -> None:
    encoded = mulaw_encode_array(ALL_INT16)
    expected = bytes(reference_lin2ulaw(int(s)) for s in ALL_INT16)
    assert encoded == expected


def test_mulaw_decode_is_bit_exact_for_every_code() -> None:
    decoded = mulaw_decode_array(bytes(range(256)))
    assert [int(v) for v in decoded] == [reference_ulaw2lin(c) for c in range(256)]


def test_mulaw_matches_audioop_where_available() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:  # Python >= 3.13
            pytest.skip("audioop not available")
    pcm = array_to_pcm16(ALL_INT16)
    assert mulaw_encode(pcm) == audioop.lin2ulaw(pcm, 2)
    assert mulaw_decode(bytes(range(256))) == audioop.ulaw2lin(bytes(range(256)), 2)


def test_known_mulaw_values() -> None:
    assert mulaw_encode(array_to_pcm16(np.array([0, 32767, -32768, -1]))) == b"\xff\x80\x00\x7e"
    assert list(mulaw_decode_array(b"\xff\x7f\x80\x00")) == [0, 0, 32124, -32124]


def test_mulaw_round_trip_error_is_bounded() -> None:
    decoded = mulaw_decode_array(mulaw_encode_array(ALL_INT16)).astype(np.int64)
    x = ALL_INT16.astype(np.int64)
    error = np.abs(decoded - x)
    in_range = np.abs(x) <= 32124
    # At most half a step, and steps double per segment: under |x|/16 plus a little near 0.
    assert np.all(error[in_range] <= 8 + np.abs(x[in_range]) // 16)
    # Beyond the largest code the value clips to ±32124.
    assert np.all(np.abs(decoded[~in_range]) == 32124)
    # Encoding is idempotent on decoded values (0x7F is "negative zero" → 0xFF).
    codes = bytes(range(256))
    expected = codes.replace(b"\x7f", b"\xff")
    assert mulaw_encode_array(mulaw_decode_array(codes)) == expected


def test_mulaw_tone_snr_is_telephone_grade() -> None:
    t = np.arange(8000) / 8000
    tone = np.rint(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    back = mulaw_decode_array(mulaw_encode_array(tone)).astype(np.float64)
    noise = back - tone
    snr_db = 10 * np.log10(np.sum(tone.astype(np.float64) ** 2) / np.sum(noise**2))
    assert snr_db > 35


def test_pcm16_helpers_reject_odd_lengths() -> None:
    assert list(pcm16_to_array(b"\x01\x00\xff\xff")) == [1, -1]
    with pytest.raises(ValueError):
        pcm16_to_array(b"\x00\x00\x00")


def _tone(freq: float, seconds: float, rate: int = 24000, amp: float = 10000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return array_to_pcm16(np.rint(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16))


def test_downsampler_streaming_equals_one_shot_with_odd_splits() -> None:
    pcm = _tone(1000, 1.0) + _tone(2500, 0.5)
    one_shot = Downsampler(3).process(pcm)
    rng = random.Random(7)
    streaming, i, ds = b"", 0, Downsampler(3)
    while i < len(pcm):
        n = rng.randint(1, 999)  # odd sizes split samples across reads
        streaming += ds.process(pcm[i : i + n])
        i += n
    assert streaming == one_shot
    samples_in = len(pcm) // 2
    assert len(one_shot) // 2 == -(-samples_in // 3)


def test_downsampler_passes_speech_band_and_stops_aliases() -> None:
    def peak(freq: float) -> int:
        out = pcm16_to_array(Downsampler(3).process(_tone(freq, 0.5)))
        return int(np.abs(out[100:]).max())

    assert abs(peak(1000) - 10000) < 100  # flat in the passband
    assert peak(3000) > 8000
    assert peak(5000) < 30  # would alias to 3 kHz at 8 kHz without the low-pass
    assert peak(7000) < 30


def test_downsampler_to_mulaw_equals_two_steps() -> None:
    pcm = _tone(700, 0.3)
    assert Downsampler(3).process_to_mulaw(pcm) == mulaw_encode(Downsampler(3).process(pcm))


# ---------------------------------------------------------------- VAD


def _mulaw_tone(ms: int, amp: float = 6000) -> bytes:
    t = np.arange(8 * ms) / 8000
    return mulaw_encode_array(np.rint(amp * np.sin(2 * np.pi * 500 * t)).astype(np.int16))


def _silence(ms: int) -> bytes:
    return b"\xff" * (8 * ms)


def _feed(vad: EnergyVAD, audio: bytes, size: int = 160) -> list[VadEvent]:
    events = []
    for i in range(0, len(audio), size):
        events += vad.push(audio[i : i + size])
    return events


def test_vad_finds_speech_and_endpoints_after_silence() -> None:
    vad = EnergyVAD()
    events = _feed(vad, _silence(200) + _mulaw_tone(500) + _silence(400))
    assert events == [
        VadEvent(VadEventKind.SPEECH_START, 200.0),
        VadEvent(VadEventKind.SPEECH_END, 700.0),
    ]
    assert not vad.in_speech
    assert vad.position_ms == 1100.0


def test_vad_ignores_silence_and_short_blips() -> None:
    vad = EnergyVAD()
    assert _feed(vad, _silence(500)) == []
    assert _feed(vad, _mulaw_tone(40) + _silence(100)) == []  # shorter than start_ms


def test_vad_short_pause_does_not_end_the_utterance() -> None:
    vad = EnergyVAD(VadConfig(end_silence_ms=300))
    audio = _mulaw_tone(200) + _silence(200) + _mulaw_tone(200) + _silence(300)
    events = _feed(vad, audio)
    assert [e.kind for e in events] == [VadEventKind.SPEECH_START, VadEventKind.SPEECH_END]
    assert events[1].at_ms == 600.0


def test_vad_quiet_noise_is_not_speech() -> None:
    rng = np.random.default_rng(1)
    noise = mulaw_encode_array(np.rint(rng.normal(0, 10, 8000)).astype(np.int16))  # ≈ -70 dBFS
    assert _feed(EnergyVAD(), noise) == []


def test_vad_pcm16_with_odd_splits_matches_mulaw() -> None:
    mulaw = _silence(100) + _mulaw_tone(300) + _silence(300)
    pcm = mulaw_decode(mulaw)
    expected = _feed(EnergyVAD(), mulaw)
    assert _feed(EnergyVAD(encoding=AudioEncoding.PCM16), pcm, size=333) == expected


def test_vad_flush_closes_an_utterance_in_progress() -> None:
    vad = EnergyVAD()
    assert [e.kind for e in _feed(vad, _mulaw_tone(300))] == [VadEventKind.SPEECH_START]
    assert vad.flush() == [VadEvent(VadEventKind.SPEECH_END, 300.0)]
    assert vad.flush() == []


def test_vad_config_is_validated() -> None:
    with pytest.raises(ValueError):
        VadConfig(end_silence_ms=0)
    with pytest.raises(ValueError):
        VadConfig(threshold_dbfs=3)
