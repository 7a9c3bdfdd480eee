// Shared by the console and the inspector pages (loaded before either).
'use strict';

// A turn's latency stages, in pipeline order, as `turn_metrics` names them; the last is
// callmesh's own share (overhead_ms).
const STAGES = [
  ['stt', 'stt_ms', 'STT'],
  ['retrieval', 'retrieval_ms', 'retrieval'],
  ['llm', 'llm_first_token_ms', 'LLM'],
  ['tts', 'tts_first_chunk_ms', 'TTS'],
  ['callmesh', 'overhead_ms', 'callmesh'],
];

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

function notice(text, kind) {
  const n = $('notice');
  n.textContent = text || '';
  n.className = `notice ${kind || ''}`;
  if (!text) n.classList.add('hidden');
}

function stagesSum(m) {
  return STAGES.reduce((a, s) => a + Number(m[s[1]] || 0), 0);
}

// One turn's latency as a horizontal bar: a segment per stage, widths relative to `scale` ms.
function latencyBar(m, scale) {
  const b = el('div', 'bar');
  for (const [cls, key, label] of STAGES) {
    const ms = Number(m[key] || 0);
    if (ms <= 0) continue;
    const seg = el('div', `seg ${cls}`);
    seg.style.width = `${(100 * ms) / scale}%`;
    seg.title = `${label} ${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
    b.appendChild(seg);
  }
  return b;
}

function stagesText(m) {
  return STAGES.map(([, key, label]) => {
    const ms = Number(m[key] || 0);
    return `${label} ${ms.toFixed(ms < 10 ? 1 : 0)}`;
  });
}
