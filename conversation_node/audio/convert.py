"""Converting a voice's audio into the format a call declared (``start.audio``).

Voices speak what they speak (simulated and Deepgram: mu-law 8 kHz; OpenAI: PCM16 24 kHz);
telephony wants mu-law 8 kHz. One :class:`Transcoder` per reply keeps the resampler's
filter state across chunks, so chunk borders do not click.
"""

from __future__ import annotations

import numpy as np

from callmesh.audio.codec import Downsampler, SampleReader, array_to_pcm16, mulaw_encode_array
from callmesh.audio.format import AudioChunk, AudioEncoding


class Transcoder:
    """Converts chunks to ``encoding`` at ``sample_rate``. Downsampling is by an integer
    factor with a low-pass filter; upsampling (rare: a narrow-band voice on a wide-band
    call) repeats samples, which is exact for the band the voice has."""

    def __init__(self, encoding: AudioEncoding, sample_rate: int) -> None:
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._down: dict[int, Downsampler] = {}
        self._readers: dict[AudioEncoding, SampleReader] = {}

    def convert(self, chunk: AudioChunk) -> bytes:
        if chunk.encoding is self.encoding and chunk.sample_rate == self.sample_rate:
            return chunk.data
        reader = self._readers.get(chunk.encoding)
        if reader is None:
            reader = SampleReader(mulaw=chunk.encoding is AudioEncoding.MULAW)
            self._readers[chunk.encoding] = reader
        samples = reader.read(chunk.data)
        rate = chunk.sample_rate
        if rate > self.sample_rate:
            if rate % self.sample_rate:
                raise ValueError(f"cannot resample {rate} Hz to {self.sample_rate} Hz")
            factor = rate // self.sample_rate
            down = self._down.get(factor)
            if down is None:
                down = self._down[factor] = Downsampler(factor)
            samples = down.process_array(samples)
        elif rate < self.sample_rate:
            if self.sample_rate % rate:
                raise ValueError(f"cannot resample {rate} Hz to {self.sample_rate} Hz")
            samples = np.repeat(samples, self.sample_rate // rate)
        if self.encoding is AudioEncoding.MULAW:
            return mulaw_encode_array(samples)
        return array_to_pcm16(samples)
