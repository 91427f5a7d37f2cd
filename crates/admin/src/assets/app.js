// lbwasm dashboard: draws the admin listener's /events stream (one snapshot a second) and
// sends every control through the admin API itself. Plain JS, no dependencies, no build.
'use strict';

const TOKEN_KEY = 'lbwasm-admin-token';
const WINDOW_MS = 5 * 60 * 1000; // chart span
const STALE_MS = 3500; // no snapshot for this long: the stream is presumed dead
const COLUMNS = ['id', 'address', 'status', 'weight', 'in_flight', 'rps', 'share', 'p50', 'p99',
  'cpu', 'mem', 'requests', 'failures', 'actions'];
const NUMERIC = new Set(['weight', 'in_flight', 'rps', 'p50', 'p99', 'cpu', 'mem', 'requests', 'failures']);

const $ = (sel) => document.querySelector(sel);

const state = {
  snapshot: null,
  history: {}, // listener name -> [{t, rps, p50, p99, share: [[id, share], ...]}]
  facts: { builtins: [], listeners: [] }, // sent once and on change: built-ins, descriptions
  listener: decodeURIComponent(location.hash.slice(1)) || null,
  rows: new Map(), // backend id -> row (keyed DOM: rows are updated, never rebuilt)
  listenerNames: '',
  builtins: '',
  es: null,
  lastMessage: 0,
  tokenPromise: null,
  tokenResolve: null,
};

// ---- formatting -------------------------------------------------------------------------

const fmtInt = (v) => (v == null ? '–' : v.toLocaleString('en-US'));
const fmtRate = (v) => (v == null ? '–' : v < 10 ? v.toFixed(1) : fmtInt(Math.round(v)));
const fmtPct = (v) => (v == null ? '–' : `${v.toFixed(0)} %`);
const fmtShare = (v) => `${(v * 100).toFixed(1)} %`;
function fmtUs(v) {
  if (v == null) return '–';
  if (v === 0) return '0';
  if (v < 1000) return `${v} µs`;
  if (v < 10000) return `${(v / 1000).toFixed(2)} ms`;
  if (v < 1e6) return `${(v / 1000).toFixed(1)} ms`;
  return `${(v / 1e6).toFixed(2)} s`;
}
/** Axis labels: as few digits as the nice steps need. */
function fmtAxisUs(v) {
  if (v === 0) return '0';
  if (v < 1000) return `${+v.toFixed(0)} µs`;
  if (v < 1e6) return `${+(v / 1000).toPrecision(3)} ms`;
  return `${+(v / 1e6).toPrecision(3)} s`;
}
const colour = (id) => `hsl(${Math.round((id * 137.508) % 360)} 62% 50%)`;

/** Sets text (and class) only when they differ: no layout work for unchanged cells. */
function put(el, text, cls) {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
  if (cls !== undefined && el.className !== cls) el.className = cls;
}

// ---- connection -------------------------------------------------------------------------

function setConn(kind) {
  const text = { live: 'live', connecting: 'connecting…', reconnecting: 'reconnecting…', token: 'token needed' }[kind];
  put($('#conn'), text, `pill ${kind}`);
  document.body.classList.toggle('stale', kind !== 'live');
}

function connect() {
  if (state.es) state.es.close();
  const token = sessionStorage.getItem(TOKEN_KEY);
  const es = new EventSource(`/events${token ? `?token=${encodeURIComponent(token)}` : ''}`);
  state.es = es;
  state.lastMessage = Date.now();
  es.addEventListener('history', (e) => {
    state.history = JSON.parse(e.data);
  });
  es.addEventListener('facts', (e) => {
    state.facts = JSON.parse(e.data);
    render();
  });
  es.onmessage = (e) => {
    state.lastMessage = Date.now();
    setConn('live');
    onSnapshot(JSON.parse(e.data));
  };
  es.onerror = () => {
    if (es !== state.es) return;
    setConn('reconnecting');
    // CONNECTING: the browser retries by itself (the server asked for 1 s). CLOSED: the
    // server answered but refused (a token?): find out why, then start again.
    if (es.readyState === EventSource.CLOSED) {
      es.close();
      state.es = null;
      checkAccess().finally(() => setTimeout(connect, 1000));
    }
  };
}

async function checkAccess() {
  try {
    await api('GET', '/backends');
  } catch (_) {
    // unreachable or refused: the next attempt tells again
  }
}

// Cluster mode: the replicas and whether each runs the latest configuration (the event
// stream carries this server's figures only; the cluster changes rarely, so a poll).
async function refreshCluster() {
  // A plain read: a missing token is asked for by the event stream, not by this poll.
  let r;
  try {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const res = await fetch('/backends', { headers: token ? { Authorization: `Bearer ${token}` } : {} });
    if (!res.ok) return;
    r = await res.json();
  } catch (_) {
    return;
  }
  const c = r && r.cluster;
  const el = $('#cluster');
  el.hidden = !c;
  if (!c) {
    // Cluster mode is set at start: a server without it never needs this poll again.
    clearInterval(clusterPoll);
    return;
  }
  const replicas = c.replicas
    .map((x) => `${x.replica}${x.replica === c.replica ? ' (this)' : ''}${x.up_to_date ? '' : ' BEHIND'}`)
    .join(', ');
  const store = c.connected ? `revision ${c.applied_revision}` : 'STORE UNAVAILABLE: serving the last applied configuration';
  put(el, `cluster ${c.name} · ${store} · replicas: ${replicas || 'none seen'}`, c.connected ? 'muted' : 'warn');
}
const clusterPoll = setInterval(refreshCluster, 2000);
refreshCluster();

// A half-open connection sends nothing and reports nothing: reopen it.
setInterval(() => {
  if (state.es && Date.now() - state.lastMessage > STALE_MS) {
    setConn('reconnecting');
    connect();
  }
}, 1000);

// ---- admin API --------------------------------------------------------------------------

function askToken(why) {
  setConn('token');
  put($('#token-why'), why || 'The admin API needs a token.');
  $('#token-bar').hidden = false;
  $('#token').focus();
  if (!state.tokenPromise) {
    state.tokenPromise = new Promise((resolve) => {
      state.tokenResolve = resolve;
    });
  }
  return state.tokenPromise;
}

function answerToken(token) {
  $('#token-bar').hidden = true;
  $('#token').value = '';
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  const resolve = state.tokenResolve;
  state.tokenPromise = null;
  state.tokenResolve = null;
  if (resolve) resolve(token);
  if (token) connect();
}

/** Calls the admin API; asks for a token on 401; throws the API's own error message. */
async function api(method, path, body, raw) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers };
    if (body !== undefined) {
      headers['Content-Type'] = raw ? 'application/wasm' : 'application/json';
      init.body = raw ? body : JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      throw new Error(`admin API unreachable (${err.message})`);
    }
    const text = await res.text();
    let data = null;
    try {
      data = JSON.parse(text);
    } catch (_) {
      // not JSON: the text is the message
    }
    const message = (data && data.error) || text.trim() || `${res.status} ${res.statusText}`;
    if (res.status === 401 && attempt < 3) {
      if ((await askToken(message)) === null) throw new Error(message);
      continue;
    }
    if (!res.ok) throw new Error(message);
    return data;
  }
}

let noticeTimer = 0;
function notice(text, kind) {
  const el = $('#notice');
  put(el, text, kind);
  el.hidden = false;
  clearTimeout(noticeTimer);
  if (kind === 'ok') noticeTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

/** Runs one control: button busy meanwhile, then the outcome (or the API's error) shown. */
async function act(button, done, call) {
  button.disabled = true;
  try {
    const answer = await call();
    notice(typeof done === 'function' ? done(answer) : done, 'ok');
  } catch (err) {
    notice(err.message, 'err');
  } finally {
    button.disabled = false;
  }
}

// ---- snapshots --------------------------------------------------------------------------

function onSnapshot(s) {
  state.snapshot = s;
  for (const l of s.listeners) {
    const points = state.history[l.name] || (state.history[l.name] = []);
    const p = { t: s.t_ms, rps: l.rps, p50: l.p50_us, p99: l.p99_us, share: l.backends.map((b) => [b.id, b.share]) };
    if (!points.length || points[points.length - 1].t < p.t) points.push(p);
    while (points.length && points[0].t < s.t_ms - WINDOW_MS) points.shift();
  }
  render();
}

function current() {
  const s = state.snapshot;
  if (!s || !s.listeners.length) return null;
  return s.listeners.find((l) => l.name === state.listener) || s.listeners[0];
}

function render() {
  const s = state.snapshot;
  const l = current();
  if (!l) return;
  state.listener = l.name;
  renderListeners(s.listeners);
  const tls = l.tls
    ? ' · TLS, ' + l.tls.map((c) => `${c.names.join(' ')} until ${c.not_after}${c.expired ? ' (EXPIRED)' : ''}`).join('; ')
    : '';
  put($('#listen'), `${l.name} · ${l.protocol} ${l.listen}${tls}`);
  put($('#totals'), `${fmtRate(l.rps)} req/s · p50 ${fmtUs(l.p50_us)} · p99 ${fmtUs(l.p99_us)}`);
  put($('#healthy'), `${l.healthy}/${l.backends.length} healthy`);
  put($('#updated'), new Date(s.t_ms).toLocaleTimeString());
  renderPlugin(l.name, l.plugin, state.facts.builtins);
  renderTable(l.backends);
  drawCharts(l, s.t_ms);
}

function renderListeners(listeners) {
  const names = listeners.map((l) => l.name);
  const select = $('#listener');
  if (names.join('\n') !== state.listenerNames) {
    state.listenerNames = names.join('\n');
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    select.closest('label').hidden = names.length < 2;
  }
  if (select.value !== state.listener) select.value = state.listener;
}

function renderPlugin(listener, p, builtins) {
  put($('#plugin-name'), p.name);
  const facts = state.facts.listeners.find((f) => f.name === listener);
  put($('#plugin-desc'), facts && facts.plugin === p.name ? facts.description : '');
  for (const dd of document.querySelectorAll('#plugin-stats dd')) {
    const key = dd.dataset.stat;
    const v = p[key];
    const bad = ['traps', 'timeouts', 'fallbacks', 'bad_answers'].includes(key) && v > 0;
    put(dd, key === 'calls_per_s' ? fmtRate(v) : fmtInt(v), bad ? 'bad' : '');
  }
  const select = $('#plugin-select');
  if (builtins.join('\n') !== state.builtins) {
    state.builtins = builtins.join('\n');
    const keep = select.value || p.name;
    select.replaceChildren(...builtins.map((n) => new Option(n, n)));
    select.value = builtins.includes(keep) ? keep : builtins[0];
  }
}

function makeRow(b) {
  const tr = document.createElement('tr');
  tr.dataset.id = b.id;
  tr.dataset.address = b.address;
  const cells = {};
  for (const c of COLUMNS) {
    const td = document.createElement('td');
    td.dataset.col = c;
    if (NUMERIC.has(c)) td.className = 'num';
    cells[c] = td;
    tr.appendChild(td);
  }
  cells.id.className = 'id';
  const swatch = document.createElement('i');
  swatch.style.background = colour(b.id);
  cells.id.append(swatch, String(b.id));
  cells.address.className = 'address';
  cells.address.textContent = b.address;
  cells.share.className = 'share';
  const shareText = document.createElement('span');
  const shareBar = document.createElement('b');
  cells.share.append(shareText, shareBar);
  cells.actions.className = 'actions';
  const drain = button('drain', 'Drain', 'no new requests; in-flight ones finish');
  const remove = button('remove', 'Remove', 'out of the pool (click twice)');
  cells.actions.append(drain, ' ', remove);
  return { tr, cells, shareText, shareBar, drain, barWidth: -1 };
}

function button(act, text, title) {
  const b = document.createElement('button');
  b.type = 'button';
  b.dataset.act = act;
  b.textContent = text;
  b.title = title;
  return b;
}

function updateRow(row, b) {
  const c = row.cells;
  put(c.status, b.status, `status ${b.status}`);
  put(c.weight, b.weight);
  put(c.in_flight, b.in_flight);
  put(c.rps, fmtRate(b.rps));
  put(row.shareText, fmtShare(b.share));
  const width = Math.round(b.share * 90);
  if (width !== row.barWidth) {
    row.barWidth = width;
    row.shareBar.style.width = `${width}px`;
  }
  put(c.p50, fmtUs(b.p50_us));
  put(c.p99, fmtUs(b.p99_us));
  put(c.cpu, fmtPct(b.cpu_percent), b.cpu_percent > 85 ? 'num hot' : 'num');
  put(c.mem, fmtPct(b.memory_percent), b.memory_percent > 85 ? 'num hot' : 'num');
  put(c.requests, fmtInt(b.requests));
  put(c.failures, fmtInt(b.failures), b.failures > 0 ? 'num hot' : 'num');
  put(row.drain, b.status === 'draining' ? 'Undrain' : 'Drain');
}

function renderTable(backends) {
  const tbody = $('#backends tbody');
  const seen = new Set();
  let before = tbody.firstChild;
  for (const b of backends) {
    seen.add(b.id);
    let row = state.rows.get(b.id);
    if (!row) {
      row = makeRow(b);
      state.rows.set(b.id, row);
    }
    if (row.tr !== before) tbody.insertBefore(row.tr, before);
    before = row.tr.nextSibling;
    updateRow(row, b);
  }
  for (const [id, row] of state.rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      state.rows.delete(id);
    }
  }
  $('#empty').hidden = backends.length > 0;
}

// ---- charts (SVG drawn here) ------------------------------------------------------------

const PAD = { l: 50, r: 8, t: 6, b: 16 };

function frame(svg) {
  const r = svg.getBoundingClientRect();
  const w = Math.max(200, Math.round(r.width));
  const h = Math.max(100, Math.round(r.height));
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  return { w, h, x0: PAD.l, x1: w - PAD.r, y0: PAD.t, y1: h - PAD.b };
}

function timeAxis(f, now) {
  let out = '';
  for (let m = 0; m <= 5; m++) {
    const x = f.x1 - ((f.x1 - f.x0) * m * 60000) / WINDOW_MS;
    out += `<line class="grid" x1="${x}" x2="${x}" y1="${f.y0}" y2="${f.y1}"/>`;
    const anchor = m === 0 ? 'end' : m === 5 ? 'start' : 'middle';
    out += `<text x="${x}" y="${f.h - 3}" text-anchor="${anchor}">${m === 0 ? 'now' : `−${m}m`}</text>`;
  }
  return out;
}

function yAxis(f, ticks) {
  let out = '';
  for (const [v, label] of ticks) {
    const y = f.y1 - (f.y1 - f.y0) * v;
    out += `<line class="grid" x1="${f.x0}" x2="${f.x1}" y1="${y}" y2="${y}"/>`;
    out += `<text x="${f.x0 - 4}" y="${y + 3}" text-anchor="end">${label}</text>`;
  }
  return out;
}

function drawCharts(l, now) {
  const points = state.history[l.name] || [];
  drawShare($('#chart-share'), points, l.backends.map((b) => b.id), now);
  drawLatency($('#chart-latency'), points, now);
}

function drawShare(svg, points, ids, now) {
  const f = frame(svg);
  const X = (t) => f.x1 - ((f.x1 - f.x0) * (now - t)) / WINDOW_MS;
  const Y = (v) => f.y1 - (f.y1 - f.y0) * Math.min(1, v);
  const order = [...ids];
  const known = new Set(ids);
  const maps = points.map((p) => {
    const m = new Map(p.share);
    for (const [id] of p.share) {
      if (!known.has(id)) {
        known.add(id);
        order.push(id); // removed since: still drawn while in the window
      }
    }
    return m;
  });
  let out = yAxis(f, [[0, '0 %'], [0.25, '25 %'], [0.5, '50 %'], [0.75, '75 %'], [1, '100 %']]) + timeAxis(f, now);
  const base = points.map(() => 0);
  for (const id of order) {
    let top = '';
    let bottom = '';
    let any = false;
    points.forEach((p, i) => {
      const v = maps[i].get(id) || 0;
      if (v > 0) any = true;
      const x = X(p.t).toFixed(1);
      top += `${i ? 'L' : 'M'}${x} ${Y(base[i] + v).toFixed(1)}`;
      bottom = `L${x} ${Y(base[i]).toFixed(1)}${bottom}`;
      base[i] += v;
    });
    if (any) out += `<path d="${top}${bottom}Z" fill="${colour(id)}" fill-opacity="0.85"/>`;
  }
  svg.innerHTML = out;
}

function niceMax(v) {
  if (!(v > 0)) return 1000;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawLatency(svg, points, now) {
  const f = frame(svg);
  const max = niceMax(Math.max(0, ...points.map((p) => p.p99 || 0)) * 1.1);
  const X = (t) => f.x1 - ((f.x1 - f.x0) * (now - t)) / WINDOW_MS;
  const Y = (v) => f.y1 - ((f.y1 - f.y0) * v) / max;
  const line = (key) => {
    let d = '';
    let pen = false;
    for (const p of points) {
      if (p[key] == null) {
        pen = false; // no requests that second: a gap, not a zero
        continue;
      }
      d += `${pen ? 'L' : 'M'}${X(p.t).toFixed(1)} ${Y(p[key]).toFixed(1)}`;
      pen = true;
    }
    return d ? `<path class="${key}" d="${d}"/>` : '';
  };
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((q) => [q, fmtAxisUs(q * max)]);
  svg.innerHTML = yAxis(f, ticks) + timeAxis(f, now) + line('p50') + line('p99');
}

// ---- controls ---------------------------------------------------------------------------

function wire() {
  $('#listener').addEventListener('change', (e) => {
    state.listener = e.target.value;
    location.hash = encodeURIComponent(state.listener);
    render();
  });

  $('#token-bar').addEventListener('submit', (e) => {
    e.preventDefault();
    answerToken($('#token').value.trim() || null);
  });
  $('#token-cancel').addEventListener('click', () => answerToken(null));

  $('#plugin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const plugin = $('#plugin-select').value;
    const options = parseOptions();
    if (options === undefined) return;
    act($('#plugin-switch'), (r) => `plugin: ${r.previous} → ${r.plugin}`, () =>
      api('POST', '/plugin', { listener: state.listener, plugin, options }));
  });

  $('#upload-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const file = $('#plugin-file').files[0];
    if (!file) {
      notice('choose a .wasm file first', 'err');
      return;
    }
    if (parseOptions() === undefined) return;
    const q = new URLSearchParams({ listener: state.listener, name: file.name });
    const text = $('#plugin-options').value.trim();
    if (text) q.set('options', text);
    act($('#plugin-upload'), (r) => `uploaded ${file.name}: plugin ${r.previous} → ${r.plugin}`, () =>
      api('POST', `/plugin/upload?${q}`, file, true));
  });

  $('#add-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const address = $('#add-address').value.trim();
    const weight = parseInt($('#add-weight').value, 10) || 1;
    act($('#add-button'), `added ${address}`, () =>
      api('POST', '/backends/add', { listener: state.listener, addresses: [address], weight }));
  });

  $('#backends tbody').addEventListener('click', (e) => {
    const btn = e.target.closest('button[data-act]');
    if (!btn) return;
    const tr = btn.closest('tr');
    const address = tr.dataset.address;
    const listener = state.listener;
    if (btn.dataset.act === 'remove') {
      if (!btn.classList.contains('armed')) {
        btn.classList.add('armed');
        btn.textContent = 'Confirm';
        btn.disarm = setTimeout(() => disarm(btn), 3000);
        return;
      }
      disarm(btn);
      act(btn, `removed ${address}`, async () => {
        const r = await api('POST', '/backends/remove', { listener, addresses: [address] });
        tr.classList.add('gone');
        return r;
      });
    } else if (btn.textContent === 'Undrain') {
      act(btn, `${address} takes requests again`, () =>
        api('POST', '/backends/add', { listener, addresses: [address] }));
    } else {
      act(btn, `draining ${address}`, () => api('POST', '/backends/drain', { listener, addresses: [address] }));
    }
  });

  window.addEventListener('resize', () => render());
}

function disarm(btn) {
  clearTimeout(btn.disarm);
  btn.classList.remove('armed');
  btn.textContent = 'Remove';
}

/** The options box as an object; undefined (and a message) when it is not JSON. */
function parseOptions() {
  const text = $('#plugin-options').value.trim();
  if (!text) return {};
  try {
    const v = JSON.parse(text);
    if (v && typeof v === 'object' && !Array.isArray(v)) return v;
  } catch (_) {
    // fall through
  }
  notice('plugin options must be a JSON object, e.g. {"seed": 1}', 'err');
  return undefined;
}

wire();
setConn('connecting');
connect();
