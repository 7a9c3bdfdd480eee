// The console's audio, both ways, apart from the page: the microphone as 16 kHz pcm16
// frames (through mic-worklet.js), and the agent's voice played as it arrives.
'use strict';

function b64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToB64(bytes) {
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

// Opens the microphone into `ctx` and calls onFrame({pcm: Int16Array, level}) for every
// `frameSamples` samples at `rate`. Echo cancellation is what lets the caller talk over
// the agent (barge-in) without the agent hearing itself; the recognizer wants the voice
// otherwise untouched, so no noise suppression or gain control.
async function openMicrophone(ctx, { rate, frameSamples, onFrame }) {
  await ctx.audioWorklet.addModule('/console/static/mic-worklet.js');
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
  });
  const node = new AudioWorkletNode(ctx, 'mic-downsampler', {
    numberOfOutputs: 1,
    processorOptions: { targetRate: rate, frameSamples },
  });
  const sink = ctx.createGain();
  sink.gain.value = 0; // keeps the worklet pulled by the graph; nothing is heard
  ctx.createMediaStreamSource(stream).connect(node).connect(sink).connect(ctx.destination);
  node.port.onmessage = (e) => onFrame(e.data);
  return {
    setMuted: (muted) => node.port.postMessage({ muted }),
    close: () => stream.getTracks().forEach((t) => t.stop()),
  };
}

// Plays `agent_audio` chunks back to back and tells when each `mark` has been played.
class AgentPlayer {
  constructor(ctx, { onMark, onPlayed, leadS = 0.04 }) {
    this.ctx = ctx;
    this.out = ctx.createGain();
    this.out.connect(ctx.destination);
    this.onMark = onMark;
    this.onPlayed = onPlayed;
    this.leadS = leadS; // scheduling margin for the first chunk after a gap
    this.playhead = 0; // context time at which everything scheduled has played
    this.sources = new Set();
    this.marks = [];
  }

  get speaking() {
    return this.playhead > this.ctx.currentTime;
  }

  // Schedules one chunk; returns when it starts to be heard (ms, performance.now()).
  play(frame) {
    const bytes = b64ToBytes(frame.data);
    const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    if (!pcm.length) return performance.now();
    const buf = this.ctx.createBuffer(1, pcm.length, frame.sample_rate);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const src = this.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.out);
    const at = Math.max(this.playhead, this.ctx.currentTime + this.leadS);
    src.start(at);
    this.playhead = at + buf.duration;
    this.sources.add(src);
    src.onended = () => {
      // A source stopped by clear() was removed first: it does not count as played.
      if (this.sources.delete(src)) this.onPlayed();
    };
    // When the chunk starts to be heard, on the page's clock (performance.now()).
    return performance.now() + (at - this.ctx.currentTime) * 1000;
  }

  // Everything scheduled so far ends at the playhead: the mark is played then.
  mark(name) {
    this.marks.push({ name, at: this.playhead });
    this.tick();
  }

  tick() {
    const now = this.ctx.currentTime;
    while (this.marks.length && this.marks[0].at <= now) this.onMark(this.marks.shift().name);
  }

  // `clear`: stop at once; what was queued was not heard, so pending marks go back now.
  clear() {
    const stopped = [...this.sources];
    this.sources.clear();
    for (const s of stopped) {
      try { s.stop(); } catch (e) { /* not started yet */ }
    }
    this.playhead = this.ctx.currentTime;
    for (const m of this.marks.splice(0)) this.onMark(m.name);
  }
}
