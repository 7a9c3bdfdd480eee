// callmesh console: one call over the native protocol (docs/protocol.md), from a browser.
//
// Microphone → AudioWorklet (mic-worklet.js: 16 kHz pcm16, 20 ms frames) → `audio` frames
// with seq and ts. Agent audio → Web Audio buffers scheduled back to back; each `mark` is
// echoed when playback reaches it; `clear` stops playback at once and echoes the pending
// marks (what Twilio does); both in audio.js. The page shows `transcript`, `agent_text`,
// `turn_metrics` (latency split by stage, fallbacks), and the owner from `ready`, then
// from `owner` frames.
'use strict';

const RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms
// Microphone RMS (full scale 1) above which a frame counts as the caller's voice, for the
// time from the end of their speech to the reply's first sound, as this browser sees it.
const VOICE_LEVEL = 0.02;

// Everything a test (or a curious person in devtools) may want to read.
const state = {
  config: null, token: null, tenant: 'demo', callId: null, ws: null, seq: 0, live: false,
  ctx: null, mic: null, player: null, muted: false, owner: null, owners: [], killAt: null,
  turns: new Map(), metrics: [], heard: new Map(), lastVoiceAt: 0, userBubble: null, lastFinal: null, agentSpeaking: false,
  stats: { framesSent: 0, chunksReceived: 0, chunksPlayed: 0, marksEchoed: 0, clears: 0,
    turnsAnswered: 0, finals: 0, interims: 0, owners: 0 },
};
window.callmeshConsole = state;

// ---------------------------------------------------------------- token

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token.token}`;
  const resp = await fetch(path, Object.assign({}, opts, { headers }));
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.message || `${resp.status} ${resp.statusText}`);
  return body;
}

async function ensureToken() {
  const tenant = $('tenant').value.trim() || 'demo';
  const now = Date.now() / 1000;
  if (state.token && state.token.tenant === tenant && state.token.expires_at - now > 60) return;
  if (!state.config.dev) {
    throw new Error('This router is not in development mode, and the console has no other way to get a token yet.');
  }
  // Development only: the router signs a short-lived token for the tenant asked for.
  state.token = null;
  state.token = await api('/console/dev-token', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ tenant, caller: 'console' }),
  });
  sessionStorage.setItem('callmesh.console.token', JSON.stringify(state.token));
}

// ---------------------------------------------------------------- UI helpers

function setConn(text, cls) {
  $('conn').textContent = text;
  $('conn').className = `conn ${cls}`;
}

function scrollDown() {
  const t = $('transcript');
  t.scrollTop = t.scrollHeight;
}

function addMessage(node) {
  $('empty').classList.add('hidden');
  $('transcript').appendChild(node);
  scrollDown();
  return node;
}

function systemLine(html, cls) {
  const m = el('div', `msg system ${cls || ''}`);
  m.innerHTML = html; // callers pass only escaped text
  return addMessage(m);
}

function renderStats() {
  const s = state.stats;
  $('st-frames').textContent = s.framesSent;
  $('st-played').textContent = s.chunksPlayed;
  $('st-marks').textContent = s.marksEchoed;
  $('st-clears').textContent = s.clears;
}

// ---------------------------------------------------------------- owner

function showOwner(node, epoch, reason) {
  const changed = state.owner && state.owner.node !== node;
  state.owner = { node, epoch };
  state.owners.push({ node, epoch, reason, at: Date.now() });
  state.stats.owners = state.owners.length;
  $('owner-node').textContent = node;
  $('owner-epoch').textContent = epoch;
  const list = $('owners');
  const li = el('li');
  li.innerHTML = `<span><b>${esc(node)}</b> · epoch ${esc(epoch)}</span><span>${esc(reason)}</span>`;
  list.prepend(li);
  if (changed) {
    const owner = $('owner-node');
    owner.classList.remove('moved');
    void owner.offsetWidth; // restart the animation
    owner.classList.add('moved');
    const gap = state.killAt ? ` ${Math.round(Date.now() - state.killAt)} ms after the kill` : '';
    const banner = $('failover-banner');
    banner.className = 'banner ok';
    banner.textContent = `The call moved to ${node} (epoch ${epoch}, ${reason})${gap}. It carries on.`;
    systemLine(`call moved to <b>${esc(node)}</b> · epoch ${esc(epoch)} · ${esc(reason)}`, 'failover');
    state.killAt = null;
  }
  $('kill-btn').disabled = !state.live;
  refreshNodes();
}

// ---------------------------------------------------------------- transcript

function userTranscript(frame) {
  const text = (frame.text || '').trim();
  if (!text) return;
  if (frame.final) {
    state.stats.finals++;
    // After a failover the new owner hears the replayed utterance again: show it once.
    if (!state.userBubble && state.lastFinal === text) return;
    state.lastFinal = text;
  } else {
    state.stats.interims++;
  }
  let b = state.userBubble;
  if (!b) {
    b = addMessage(el('div', 'msg user interim'));
    b.appendChild(el('div', 'who', 'you'));
    b.appendChild(el('div', 'text'));
    state.userBubble = b;
  }
  b.querySelector('.text').textContent = text;
  if (frame.final) {
    b.classList.remove('interim');
    b.classList.add('final');
    const low = typeof frame.confidence === 'number' && frame.confidence < 0.5;
    b.querySelector('.who').textContent = low ? `you · heard with low confidence (${frame.confidence})` : 'you';
    state.userBubble = null;
  } else {
    b.querySelector('.who').textContent = 'you · hearing…';
  }
  scrollDown();
}

function agentTurn(turn) {
  let t = state.turns.get(turn);
  if (!t) {
    const m = el('div', 'msg agent');
    m.dataset.turn = turn;
    m.appendChild(el('div', 'who', turn === 0 ? 'agent · greeting' : `agent · turn ${turn}`));
    m.appendChild(el('div', 'text'));
    t = { el: m, texts: new Map() };
    state.turns.set(turn, t);
    if (state.userBubble && !state.userBubble.classList.contains('final')) {
      // An interim that never became final (noise, or cut off): it is not a turn.
      state.userBubble.remove();
      state.userBubble = null;
    }
    addMessage(m);
  }
  return t;
}

function agentText(frame) {
  const t = agentTurn(frame.turn);
  t.texts.set(frame.n, frame.text);
  const ordered = [...t.texts.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1]);
  t.el.querySelector('.text').textContent = ordered.join(' ');
  scrollDown();
}

// The first chunk of a reply to the caller: how long after they stopped speaking it is
// heard here (network, router, node and playback scheduling included).
function firstAudio(frame, startsAt) {
  if (frame.turn < 1 || state.heard.has(frame.turn) || !state.lastVoiceAt) return;
  const ms = startsAt - state.lastVoiceAt;
  if (ms > 0) state.heard.set(frame.turn, ms);
}

function turnMetrics(m) {
  state.stats.turnsAnswered++;
  state.metrics.push(m);
  const t = agentTurn(m.turn);
  if (t.el.querySelector('.latency')) return;
  const box = el('div', 'latency');
  const total = m.latency_ms || 0;
  if (m.spoke !== false && total > 0) {
    const bar = latencyBar(m, Math.max(total, stagesSum(m)));
    bar.title = `${Math.round(total)} ms from the end of your speech to the agent's first audio`;
    const heard = state.heard.get(m.turn);
    const here = heard ? ` · heard here ${Math.round(heard)} ms after you stopped` : '';
    box.appendChild(el('div', '', `${Math.round(total)} ms to first audio${here}`));
    box.appendChild(bar);
    const legend = el('div', 'parts');
    for (const text of stagesText(m)) legend.appendChild(el('span', '', text));
    box.appendChild(legend);
  } else {
    box.appendChild(el('div', '', m.interrupted ? 'cut off before it spoke' : 'no audio'));
  }
  const chips = el('div', 'chips');
  chips.appendChild(el('span', 'chip node', `${m.node} · epoch ${m.epoch}`));
  if (m.intent) chips.appendChild(el('span', 'chip node', `intent ${m.intent}`));
  for (const f of m.fallbacks || []) chips.appendChild(el('span', 'chip', `fallback: ${f}`));
  box.appendChild(chips);
  t.el.appendChild(box);
  if (m.interrupted) t.el.classList.add('interrupted');
  if (state.owner && m.epoch > state.owner.epoch) showOwner(m.node, m.epoch, 'turn');
  scrollDown();
}

// ---------------------------------------------------------------- playback

function echoMark(name) {
  send({ type: 'mark', name });
  state.stats.marksEchoed++;
}

function tick() {
  if (!state.player) return;
  state.player.tick();
  const speaking = state.player.speaking;
  if (speaking !== state.agentSpeaking) {
    state.agentSpeaking = speaking;
    $('speaking').textContent = speaking ? 'agent speaking' : 'agent silent';
    $('speaking').className = `pill ${speaking ? 'on' : 'off'}`;
  }
  renderStats();
}

function clearPlayback(frame) {
  if (state.player) state.player.clear();
  state.stats.clears++;
  const t = state.turns.get(frame.turn);
  if (frame.reason === 'barge_in') {
    if (t) {
      t.el.classList.add('interrupted');
      if (!t.el.querySelector('.tag')) t.el.querySelector('.who').appendChild(el('span', 'tag', 'you interrupted'));
    }
  } else if (t) {
    // A failover whose new owner says something else: its reply starts over.
    t.texts.clear();
    t.el.querySelector('.text').textContent = '';
  }
  tick();
}

// ---------------------------------------------------------------- the call

function send(frame) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  // Keys in this order (type, seq, data, ts): the router's fast path for audio frames.
  const msg = Object.assign({ type: frame.type, seq: ++state.seq }, frame);
  ws.send(JSON.stringify(msg));
}

function onFrame(frame) {
  switch (frame.type) {
    case 'ready':
      state.live = true;
      setConn('live', 'live');
      showOwner(frame.node, frame.epoch, frame.resumed ? 'resumed' : 'start');
      break;
    case 'owner':
      showOwner(frame.node, frame.epoch, frame.reason || 'moved');
      break;
    case 'transcript':
      userTranscript(frame);
      break;
    case 'agent_text':
      agentText(frame);
      break;
    case 'agent_audio':
      state.stats.chunksReceived++;
      if (state.player) firstAudio(frame, state.player.play(frame));
      break;
    case 'mark':
      if (state.player) state.player.mark(frame.name);
      break;
    case 'clear':
      clearPlayback(frame);
      break;
    case 'turn_metrics':
      turnMetrics(frame);
      break;
    case 'error':
      systemLine(`error <b>${esc(frame.code)}</b>: ${esc(frame.message)}`);
      break;
    case 'call_ended':
      endCall('the call ended');
      break;
    default:
      break; // frames added later are ignored, as the protocol asks
  }
}

// A new call starts on a clean page.
function resetCallView() {
  for (const m of [...$('transcript').querySelectorAll('.msg')]) m.remove();
  state.turns.clear();
  state.metrics = [];
  state.heard.clear();
  state.userBubble = null;
  state.lastFinal = null;
  state.owner = null;
  state.owners = [];
  for (const k of Object.keys(state.stats)) state.stats[k] = 0;
  $('owners').textContent = '';
  $('owner-node').textContent = '—';
  $('owner-epoch').textContent = '—';
  $('failover-banner').className = 'banner hidden';
  renderStats();
}

async function startCall() {
  notice('');
  if (state.callId) resetCallView();
  $('start-btn').disabled = true;
  try {
    // Created before anything is awaited: browsers let a page play sound when the
    // context comes from the click itself.
    state.ctx = new AudioContext({ latencyHint: 'interactive' });
    await ensureToken();
    state.tenant = state.token.tenant;
    // The token covers calls whose id starts with its prefix.
    state.callId = `${state.token.call_prefix || 'console-'}${Math.random().toString(36).slice(2, 12)}`;
    await state.ctx.resume();
    state.player = new AgentPlayer(state.ctx, {
      onMark: echoMark,
      onPlayed: () => { state.stats.chunksPlayed++; renderStats(); },
    });
    let frames = 0;
    state.mic = await openMicrophone(state.ctx, {
      rate: RATE,
      frameSamples: FRAME_SAMPLES,
      onFrame: ({ pcm, level }) => {
        $('mic-level').style.width = `${Math.min(100, level * 400)}%`;
        if (level >= VOICE_LEVEL) state.lastVoiceAt = performance.now();
        if (!(state.ws && state.ws.readyState === WebSocket.OPEN)) return;
        send({ type: 'audio', data: bytesToB64(new Uint8Array(pcm.buffer)), ts: frames * 20 });
        frames++;
        state.stats.framesSent++;
        if (frames % 10 === 0) renderStats();
      },
    });
    connect();
  } catch (err) {
    notice(`Could not start the call: ${err.message}`, 'error');
    teardown();
    $('start-btn').disabled = false;
  }
}

function connect() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${proto}//${location.host}/console/api/calls/${state.callId}/stream?token=${encodeURIComponent(state.token.token)}`;
  setConn('connecting…', 'connecting');
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => {
    state.seq = 0;
    // Tenant and caller are the token's: the router refuses any others.
    send({ type: 'start', tenant: state.tenant, caller: state.token.caller, audio: { encoding: 'pcm16', sample_rate: RATE } });
    $('call-id').textContent = state.callId;
    const link = $('inspect-link');
    link.href = `/console/calls/${state.callId}`;
    link.classList.remove('hidden');
    $('hangup-btn').disabled = false;
    $('mute-btn').disabled = false;
  };
  ws.onmessage = (e) => {
    let frame;
    try { frame = JSON.parse(e.data); } catch (err) { return; }
    onFrame(frame);
  };
  ws.onclose = (e) => {
    if (state.ws === ws && state.live) endCall(`connection closed (${e.code}${e.reason ? ': ' + e.reason : ''})`);
    else if (state.ws === ws) {
      notice(`The router refused the call (${e.code}${e.reason ? ': ' + e.reason : ''}).`, 'error');
      teardown();
      $('start-btn').disabled = false;
    }
  };
}

function hangup() {
  send({ type: 'hangup' });
  $('hangup-btn').disabled = true;
}

function endCall(why) {
  systemLine(esc(why));
  setConn('ended', 'ended');
  teardown();
  $('start-btn').disabled = false;
  $('start-btn').textContent = 'New call';
}

function teardown() {
  state.live = false;
  if (state.ws && state.ws.readyState <= WebSocket.OPEN) state.ws.close(1000);
  state.ws = null;
  if (state.mic) state.mic.close();
  state.mic = null;
  if (state.player) state.player.clear();
  state.player = null;
  if (state.ctx) state.ctx.close();
  state.ctx = null;
  $('hangup-btn').disabled = true;
  $('mute-btn').disabled = true;
  $('kill-btn').disabled = true;
  $('mic-level').style.width = '0';
  state.agentSpeaking = false;
  $('speaking').textContent = 'agent silent';
  $('speaking').className = 'pill off';
}

function toggleMute() {
  state.muted = !state.muted;
  if (state.mic) state.mic.setMuted(state.muted);
  $('mute-btn').textContent = state.muted ? 'Unmute' : 'Mute';
}

async function killOwner() {
  if (!state.owner) return;
  const victim = state.owner.node;
  const btn = $('kill-btn');
  btn.disabled = true;
  const banner = $('failover-banner');
  banner.className = 'banner';
  banner.textContent = `Killing ${victim}…`;
  state.killAt = Date.now();
  systemLine(`<b>${esc(victim)}</b> killed from the console`, 'failover');
  try {
    const r = await api(`/console/api/calls/${state.callId}/kill-owner`, { method: 'POST' });
    // The call may already have moved (the owner frame can beat this answer).
    if (state.owner && state.owner.node === victim) {
      banner.textContent = `${r.killed} was killed (SIGKILL). The router notices and moves the call…`;
    }
    refreshNodes();
  } catch (err) {
    state.killAt = null;
    banner.textContent = `Could not kill the owner: ${err.message}`;
    btn.disabled = false;
  }
}

// ---------------------------------------------------------------- cluster

async function refreshNodes() {
  let st;
  try {
    const r = await fetch('/v1/status');
    st = await r.json();
  } catch (e) {
    return;
  }
  $('router-id').textContent = st.router || '';
  const ul = $('nodes');
  ul.textContent = '';
  for (const n of st.nodes || []) {
    const li = el('li');
    const dead = !n.alive;
    const cls = dead ? 'dead' : n.suspect ? 'suspect' : n.state !== 'active' ? 'draining' : '';
    li.appendChild(el('span', `dot ${cls}`));
    li.appendChild(el('span', 'name', n.node));
    li.appendChild(el('span', 'muted small', dead ? 'dead' : n.suspect ? 'suspect' : n.state));
    li.appendChild(el('span', 'calls', `${n.calls} call${n.calls === 1 ? '' : 's'}`));
    if (state.owner && n.node === state.owner.node) li.classList.add('owner-row');
    if (dead) li.classList.add('gone');
    ul.appendChild(li);
  }
  if (!(st.nodes || []).length) ul.appendChild(el('li', 'muted small', 'no nodes'));
}

// ---------------------------------------------------------------- start

async function init() {
  $('start-btn').onclick = startCall;
  $('hangup-btn').onclick = hangup;
  $('mute-btn').onclick = toggleMute;
  $('kill-btn').onclick = killOwner;
  try {
    state.config = await api('/console/api/config');
  } catch (err) {
    notice(`The router did not answer: ${err.message}`, 'error');
    return;
  }
  const badge = $('mode-badge');
  badge.textContent = state.config.dev ? 'development' : 'production';
  if (state.config.dev) badge.classList.add('dev');
  if (state.config.kill) {
    $('kill-btn').classList.remove('hidden');
    $('kill-note').classList.remove('hidden');
  }
  if (!state.config.dev) {
    notice('This router is not in development mode: the console cannot get a call token here yet.');
    $('start-btn').disabled = true;
  }
  if (!window.isSecureContext) {
    notice('The microphone needs a secure page: open the console on http://127.0.0.1 or localhost, or over https.', 'error');
  }
  refreshNodes();
  setInterval(refreshNodes, 1000);
  setInterval(tick, 20);
}

init();
