// The microphone, as the native protocol wants it: 16 kHz mono pcm16 in 20 ms frames.
// Runs on the audio thread. The context runs at the device's rate (44.1 or 48 kHz): each
// input sample goes through a windowed-sinc low-pass (cut-off below the new Nyquist, so
// nothing aliases), and output samples are taken at fractional positions by linear
// interpolation between filtered samples. Each full frame is posted to the page with its
// RMS level (for the meter), as an Int16Array whose buffer is transferred, not copied.
'use strict';

const TAPS = 63;

function lowpass(cutoffRatio) {
  // cutoffRatio: cut-off / input rate (< 0.5). Blackman window.
  const h = new Float32Array(TAPS);
  const mid = (TAPS - 1) / 2;
  let sum = 0;
  for (let i = 0; i < TAPS; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoffRatio : Math.sin(2 * Math.PI * cutoffRatio * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (TAPS - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (TAPS - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < TAPS; i++) h[i] /= sum;
  return h;
}

class MicDownsampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.target = opts.targetRate || 16000;
    this.frameSamples = opts.frameSamples || 320;
    this.step = sampleRate / this.target; // input samples per output sample
    this.taps = lowpass(Math.min(0.45 * this.target, 7200) / sampleRate);
    this.history = new Float32Array(TAPS);
    this.pos = 0; // ring position in history
    this.prev = 0; // last filtered sample
    this.t = 0; // position of the next output sample, relative to the last input sample
    this.frame = new Int16Array(this.frameSamples);
    this.n = 0;
    this.energy = 0;
    this.muted = false;
    this.port.onmessage = (e) => {
      if (e.data && typeof e.data.muted === 'boolean') this.muted = e.data.muted;
    };
  }

  filtered(sample) {
    const hist = this.history;
    hist[this.pos] = sample;
    let acc = 0;
    let j = this.pos;
    for (let i = 0; i < TAPS; i++) {
      acc += this.taps[i] * hist[j];
      j = j === 0 ? TAPS - 1 : j - 1;
    }
    this.pos = (this.pos + 1) % TAPS;
    return acc;
  }

  emit(value) {
    const v = this.muted ? 0 : Math.max(-1, Math.min(1, value));
    this.frame[this.n++] = v < 0 ? v * 32768 : v * 32767;
    this.energy += v * v;
    if (this.n === this.frameSamples) {
      const level = Math.sqrt(this.energy / this.n);
      this.port.postMessage({ pcm: this.frame, level }, [this.frame.buffer]);
      this.frame = new Int16Array(this.frameSamples);
      this.n = 0;
      this.energy = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    const channel = input && input[0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const cur = this.filtered(channel[i]);
      // Output samples falling between the previous input sample and this one.
      while (this.t <= 1) {
        this.emit(this.prev + (cur - this.prev) * this.t);
        this.t += this.step;
      }
      this.t -= 1;
      this.prev = cur;
    }
    return true;
  }
}

registerProcessor('mic-downsampler', MicDownsampler);
