// callmesh call inspector: a call's replay (the event log, rebuilt and verified by the
// router with events.replay, as `callmesh replay` does), for the token's tenant only.
'use strict';

const callId = decodeURIComponent(location.pathname.split('/').pop());
const inspector = { token: null, report: null, timer: null };
window.callmeshInspector = inspector;

async function token() {
  const saved = JSON.parse(sessionStorage.getItem('callmesh.console.token') || 'null');
  const tenant = new URLSearchParams(location.search).get('tenant') || (saved && saved.tenant) || 'demo';
  if (saved && saved.tenant === tenant && saved.expires_at - Date.now() / 1000 > 30) return saved;
  // Development only: as the console does (router/console.py).
  const resp = await fetch('/console/dev-token', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ tenant, caller: 'inspector' }),
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.message || `no token (${resp.status})`);
  sessionStorage.setItem('callmesh.console.token', JSON.stringify(body));
  return body;
}

function kv(pairs) {
  const dl = el('dl', 'kv');
  for (const [k, v] of pairs) {
    if (v === undefined || v === null || v === '') continue;
    const row = el('div');
    row.appendChild(el('dt', '', k));
    row.appendChild(el('dd', '', String(v)));
    dl.appendChild(row);
  }
  return dl;
}

function summary(r) {
  const s = $('summary');
  s.textContent = '';
  const fin = r.final_state;
  const verdict = r.verified === true ? ['verified', 'ok'] : r.verified === false ? ['diverged', 'bad'] : ['not verified', 'none'];
  const items = [
    ['call', r.call_id], ['tenant', r.tenant], ['caller', fin.caller || '?'],
    ['status', fin.status + (fin.ended_reason ? ` (${fin.ended_reason})` : '')],
    ['turns', fin.turn], ['owner', `${fin.node || '?'} · epoch ${fin.epoch}`],
    ['records', r.turns.reduce((a, t) => a + t.records.length, 0)],
  ];
  for (const [k, v] of items) {
    const d = el('div');
    d.appendChild(el('dt', '', k));
    d.appendChild(el('dd', '', String(v)));
    s.appendChild(d);
  }
  const v = el('div');
  v.appendChild(el('dt', '', 'checkpoint'));
  const dd = el('dd', `verdict ${verdict[1]}`, verdict[0]);
  dd.title = r.verified === true ? 'the log reproduces the last checkpoint' : '';
  v.appendChild(dd);
  s.appendChild(v);
  const w = $('warnings');
  w.textContent = '';
  for (const d of r.divergences || []) w.appendChild(el('li', '', `diverged in ${d.field}`));
  for (const text of r.warnings || []) w.appendChild(el('li', '', text));
  $('live-badge').classList.toggle('hidden', !r.live);
  $('live-badge').className = `pill ${r.live ? 'on' : 'off'}${r.live ? '' : ' hidden'}`;
}

function chart(r) {
  const c = $('chart');
  c.textContent = '';
  const rows = r.metrics.filter((m) => m.spoke !== false && m.latency_ms > 0);
  if (!rows.length) {
    c.appendChild(el('p', 'muted', 'No turn metrics in the log yet.'));
    return;
  }
  const peak = Math.max(...rows.map((m) => Math.max(m.latency_ms, stagesSum(m))));
  for (const m of rows) {
    const row = el('div', 'row');
    row.appendChild(el('span', 'muted', `turn ${m.turn}`));
    row.appendChild(latencyBar(m, peak));
    row.appendChild(el('span', 'ms', `${Math.round(m.latency_ms)} ms`));
    c.appendChild(row);
  }
}

function ownership(r) {
  const ol = $('ownership');
  ol.textContent = '';
  for (const o of r.final_state.ownership || []) {
    const li = el('li');
    li.innerHTML = '';
    const left = el('span');
    left.appendChild(el('b', '', o.node));
    left.appendChild(document.createTextNode(` · epoch ${o.epoch} · from turn ${o.turn}`));
    li.appendChild(left);
    li.appendChild(el('span', '', o.reason));
    ol.appendChild(li);
  }
}

function turnCard(r, group) {
  const turn = group.turn;
  const recs = group.records;
  const of = (type) => recs.filter((x) => x.type === type);
  const one = (type) => of(type)[0];
  const card = el('article', 'turn');
  card.dataset.turn = turn;
  const head = el('header');
  head.appendChild(el('span', 'n', turn === 0 ? 'turn 0 · greeting' : `turn ${turn}`));
  const metrics = one('turn_metrics');
  const m = metrics ? metrics.metrics || {} : {};
  const meta = el('span', 'meta');
  if (m.intent) meta.appendChild(el('span', 'chip node', `intent ${m.intent}`));
  if (m.node) meta.appendChild(el('span', 'chip node', `${m.node} · epoch ${m.epoch}`));
  for (const f of of('fallback')) meta.appendChild(el('span', 'chip', `fallback: ${f.kind}`));
  if (m.latency_ms) meta.appendChild(el('span', 'chip node', `${Math.round(m.latency_ms)} ms`));
  head.appendChild(meta);
  card.appendChild(head);
  for (const o of of('ownership')) {
    card.appendChild(el('div', 'ownership', `ownership: ${o.node} took the call with epoch ${o.epoch} (${o.reason})`));
  }
  const body = el('div', 'body');
  const left = el('div', 'said');
  const user = one('user_turn');
  if (user) {
    const u = el('p', 'u', user.text);
    if (user.understood === false) u.appendChild(el('span', 'chip', 'not understood'));
    left.appendChild(u);
  }
  for (const a of of('agent_reply')) {
    const p = el('p', 'a', a.interrupted ? a.heard || '' : a.text);
    if (a.interrupted) p.appendChild(el('span', 'chip', `interrupted; said "${a.text}"`));
    left.appendChild(p);
  }
  for (const b of of('barge_in')) {
    const heard = b.heard ? `after hearing "${b.heard}"` : 'before any of it was heard';
    left.appendChild(el('p', 'muted small', `the caller barged in ${heard}`));
  }
  const ret = one('retrieval');
  const llm = one('llm');
  const facts = one('memory');
  const details = [];
  if (ret) {
    const flags = ['timed_out', 'from_cache', 'partial'].filter((f) => ret[f]).map((f) => f.replace('_', ' '));
    details.push(['retrieval', `${(ret.answered || []).join(', ') || 'nothing'} · ${(ret.snippets || []).length} snippet(s)${flags.length ? ' · ' + flags.join(', ') : ''}`]);
  }
  if (llm) {
    details.push(['prompt', `${llm.prompt_tokens} tokens · digest ${String(llm.prompt_digest || '').slice(0, 16)}`]);
    const tools = (llm.tool_calls || []).map((t) => `${t.name}(${JSON.stringify(t.arguments)})`).join(', ');
    if (tools) details.push(['tools', tools]);
  }
  if (facts && facts.facts_set && Object.keys(facts.facts_set).length) {
    details.push(['facts set', Object.entries(facts.facts_set).map(([k, v]) => `${k} = ${v}`).join(', ')]);
  }
  const effects = (r.final_state.effects || []).filter((e) => e.turn === turn);
  for (const e of effects) {
    const lag = e.lag_ms !== null && e.lag_ms !== undefined ? `, lag ${e.lag_ms} ms` : '';
    const how = e.outcome === 'pending'
      ? 'pending: not delivered yet (is an effects worker running?)'
      : `${e.outcome.replace('_', ' ')} after ${e.attempts} attempt(s)${e.status ? ', status ' + e.status : ''}${lag}`;
    details.push([`effect ${e.kind}`, how]);
  }
  left.appendChild(kv(details));
  body.appendChild(left);
  const right = el('div');
  const st = (r.state_by_turn || {})[String(turn)];
  if (st) {
    right.appendChild(el('div', 'muted small', `state after turn ${turn} · ${st.node} epoch ${st.epoch} · seq ${st.last_seq}`));
    const table = el('table', 'facts');
    const factRows = Object.entries(st.facts || {});
    if (!factRows.length) right.appendChild(el('div', 'muted small', 'no facts yet'));
    for (const [slot, [value, setAt, replaced]] of factRows) {
      const tr = el('tr');
      tr.appendChild(el('td', 'muted', slot));
      tr.appendChild(el('td', '', value));
      tr.appendChild(el('td', 'muted small', `turn ${setAt}${replaced !== null && replaced !== undefined ? `, was ${replaced}` : ''}`));
      table.appendChild(tr);
    }
    right.appendChild(table);
  }
  if (metrics) {
    right.appendChild(latencyBar(m, Math.max(m.latency_ms || 1, stagesSum(m))));
    right.appendChild(el('div', 'muted small', stagesText(m).join(' · ')));
  }
  body.appendChild(right);
  card.appendChild(body);
  const det = el('details', 'records');
  det.appendChild(el('summary', '', `${recs.length} records`));
  const table = el('table', 'recs');
  const t0 = r.turns.length && r.turns[0].records.length ? r.turns[0].records[0].ts_ms : 0;
  for (const rec of recs) {
    const tr = el('tr');
    tr.appendChild(el('td', 't', `+${((rec.ts_ms - t0) / 1000).toFixed(3)}s`));
    tr.appendChild(el('td', 'k', rec.type + (rec._pending ? ' (pending)' : '')));
    tr.appendChild(el('td', '', rec._text));
    table.appendChild(tr);
  }
  det.appendChild(table);
  card.appendChild(det);
  return card;
}

function render(r) {
  inspector.report = r;
  summary(r);
  chart(r);
  ownership(r);
  const turns = $('turns');
  turns.textContent = '';
  for (const group of r.turns) turns.appendChild(turnCard(r, group));
}

async function load() {
  try {
    inspector.token = await token();
    $('tenant-badge').textContent = `tenant ${inspector.token.tenant}`;
    const resp = await fetch(`/console/api/calls/${encodeURIComponent(callId)}`, {
      headers: { Authorization: `Bearer ${inspector.token.token}` },
    });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(body.message || `${resp.status}`);
    notice('');
    render(body);
    clearTimeout(inspector.timer);
    if (body.live) inspector.timer = setTimeout(load, 3000); // a live call keeps growing
  } catch (err) {
    notice(`Cannot show call ${callId}: ${err.message}`, 'error');
  }
}

$('refresh-btn').onclick = load;
load();
