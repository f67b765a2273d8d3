// The canvas shell: signs the user in, mounts the UIs deployed to them (each in a sandboxed
// iframe on the frame origin), keeps them current over /ws, and answers their `ichi` requests
// as the user. The user's token lives only in this module's closure: frames get data, never
// credentials. With ?debug=1 a timeline of the data flow and an inspector sit beside the UIs.
(() => {
  const body = document.body;
  const app = body.dataset.app || '';
  const frameOrigin = body.dataset.frameOrigin;
  const params = new URLSearchParams(location.search);
  const debug = params.get('debug') === '1';
  const channels = (params.get('channels') || '').split(',').map((s) => s.trim()).filter(Boolean);
  const shell = document.getElementById('ichi-shell');
  let token = null;
  let me = null;
  let ws = null;
  const frames = new Map(); // key name|target → { ui, iframe, ready, subs:Set }
  const subs = new Map(); // sub id → { frame, kind, name }
  const timeline = [];
  let seq = 0;

  const el = (tag, attrs, ...kids) => {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') n.className = v; else if (k.startsWith('on')) n.addEventListener(k.slice(2), v); else if (v != null) n.setAttribute(k, v);
    }
    for (const k of kids.flat()) if (k != null) n.append(k.nodeType ? k : document.createTextNode(String(k)));
    return n;
  };
  const status = el('div', { id: 'ichi-status', class: 'ichi-status' }, 'starting');
  const main = el('main', { id: 'ichi-uis', class: 'ichi-uis' });
  const tl = el('ol', { id: 'ichi-timeline', class: 'ichi-timeline' });
  const inspect = el('div', { id: 'ichi-inspect', class: 'ichi-inspect' }, 'Click an element of a UI to see where its data came from.');
  shell.append(status, el('div', { class: 'ichi-layout' }, main,
    debug ? el('aside', { id: 'ichi-debug', class: 'ichi-debug' }, el('h2', null, 'Inspector'), inspect, el('h2', null, 'Timeline'), tl) : null));
  const setStatus = (s) => { status.textContent = s; status.dataset.state = s.split(':')[0]; };

  function auth(headers) {
    const h = Object.assign({}, headers || {});
    if (token) h['Authorization'] = 'Bearer ' + token;
    return h;
  }
  async function api(method, path, bodyValue, raw) {
    const r = await fetch(path, { method, headers: auth(raw ? { 'Content-Type': 'text/plain' } : bodyValue !== undefined ? { 'Content-Type': 'application/json' } : {}),
      body: raw ? bodyValue : bodyValue !== undefined ? JSON.stringify(bodyValue) : undefined, credentials: 'same-origin' });
    if (r.status === 401 && token) {
      // The access token expired (15 min): carry on with the session cookie.
      token = null;
      return api(method, path, bodyValue, raw);
    }
    const text = await r.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
    if (!r.ok) {
      const e = (json && json.error) || { message: text || r.statusText };
      throw Object.assign(new Error(e.message || ('HTTP ' + r.status)), { status: r.status, code: e.code, name_: e.name, line: e.line });
    }
    return { json, headers: r.headers };
  }

  // ---- timeline (debug mode)
  function record(entry) {
    entry.id = ++seq;
    entry.at = new Date().toISOString().slice(11, 23);
    timeline.push(entry);
    if (timeline.length > 500) timeline.shift();
    if (!debug) return entry;
    const li = el('li', { class: 'ichi-tl-' + entry.kind, 'data-kind': entry.kind, 'data-id': String(entry.id) }, `${entry.at} ${entry.kind}: ${entry.label || ''}`);
    entry.li = li;
    tl.prepend(li);
    return entry;
  }
  function describeSteps(trace) {
    const ol = el('ol', { class: 'ichi-steps' });
    for (const s of (trace.steps || []).slice(0, 300)) {
      const vars = Object.entries(s.locals || {}).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join(', ');
      // `skipped`: visits of this line hot-line sampling did not record before this step.
      ol.append(el('li', { 'data-line': String(s.line), title: vars }, `line ${s.line}${s.skipped ? ' (+' + s.skipped + ' visits not recorded)' : ''}${vars ? ': ' + vars : ''}`));
    }
    return ol;
  }
  async function attachTrace(entry) {
    if (!entry.traceId || !entry.traced) return;
    try {
      const { json } = await api('GET', '/trace/' + encodeURIComponent(entry.traceId));
      entry.trace = json;
      if (entry.li) entry.li.append(describeSteps(json));
    } catch (e) { entry.traceError = e.message; }
  }
  function leaves(v, out) {
    if (v == null) return out;
    if (typeof v !== 'object') { out.push(String(v)); return out; }
    for (const x of Object.values(v)) leaves(x, out);
    return out;
  }
  function producer(text) {
    const t = (text || '').trim();
    if (!t) return null;
    for (let i = timeline.length - 1; i >= 0; i--) {
      const e = timeline[i];
      if (e.kind !== 'call' && e.kind !== 'sql' && e.kind !== 'cdc') continue;
      const vals = leaves(e.result, []).filter((s) => s.length > 0);
      if (vals.some((s) => t === s || t.includes(s) && s.length >= 2)) return e;
    }
    return null;
  }
  async function showInspect(f, m) {
    const e = producer(m.text);
    const src = m.src ? `${f.ui.name}.tsx:${m.src}` : `${f.ui.name}.tsx (no position)`;
    inspect.replaceChildren(el('div', { id: 'ichi-inspect-element' }, `<${m.tag}> ${JSON.stringify((m.text || '').slice(0, 80))}`),
      el('div', { id: 'ichi-inspect-source' }, 'TSX: ' + src));
    if (!e) { inspect.append(el('div', { id: 'ichi-inspect-call' }, 'No call produced this text.')); return; }
    if (e.kind === 'call' && e.traced && !e.trace) await attachTrace(e);
    inspect.append(el('div', { id: 'ichi-inspect-call' }, e.kind === 'call' ? `ichi.call('${e.fn}', ${JSON.stringify(e.args)})` : e.label));
    if (e.kind === 'call') {
      inspect.append(el('div', { id: 'ichi-inspect-trace-id' }, e.traceId ? 'trace ' + e.traceId : 'untraced'));
      if (e.trace) inspect.append(el('div', { id: 'ichi-inspect-vars' }, describeSteps(e.trace)));
      else if (e.traceError || !e.traced) inspect.append(el('div', { id: 'ichi-inspect-vars' }, e.traceError || 'no trace (needs the admin, the function owner or [traces] debug_roles)'));
    }
    const rows = e.kind === 'sql' ? e.result : e.result;
    inspect.append(el('pre', { id: 'ichi-inspect-rows' }, JSON.stringify(rows, null, 1).slice(0, 4000)));
  }

  // ---- frames
  const key = (ui) => ui.name + '|' + ui.target;
  const visible = (ui) => !app || ui.name === app || ui.name.startsWith(app + '-');
  function send(f, msg) { if (f.iframe.contentWindow) f.iframe.contentWindow.postMessage(Object.assign({ ichi: 1 }, msg), '*'); }
  function mountUi(ui) {
    if (!visible(ui)) return;
    let f = frames.get(key(ui));
    record({ kind: 'deploy', label: `${ui.name} v${ui.version} → ${ui.target}`, ui });
    if (!f) {
      const iframe = el('iframe', { sandbox: 'allow-scripts', referrerpolicy: 'no-referrer', class: 'ichi-frame', title: ui.name, src: frameOrigin + '/frame' });
      const box = el('section', { class: 'ichi-ui', 'data-ui': ui.name, 'data-target': ui.target, 'data-version': String(ui.version) }, iframe);
      f = { ui, iframe, box, ready: false, subs: new Set(), t0: performance.now() };
      frames.set(key(ui), f);
      main.append(box);
    } else {
      f.ui = ui;
      f.t0 = performance.now();
      f.box.dataset.version = String(ui.version);
      f.box.dataset.painted = '';
      if (f.ready) send(f, { op: 'mount', ui, debug });
    }
  }
  function removeUi(name, target) {
    const f = frames.get(name + '|' + target);
    if (!f) return;
    for (const s of f.subs) unsubscribe(s);
    f.box.remove();
    frames.delete(name + '|' + target);
  }
  const frameOf = (source) => { for (const f of frames.values()) if (f.iframe.contentWindow === source) return f; return null; };

  function sqlUrl(params) {
    const q = new URLSearchParams({ default_format: 'JSON' });
    for (const [k, v] of Object.entries(params || {})) q.set('param_' + k, typeof v === 'object' && v !== null ? JSON.stringify(v) : v === null ? '\\N' : String(v));
    return '/?' + q.toString();
  }
  function unsubscribe(sub) {
    const s = subs.get(sub);
    if (!s) return;
    subs.delete(sub);
    if (s.kind === 'table' && ws && ws.readyState === 1) ws.send(JSON.stringify({ type: 'unsubscribe', sub }));
  }

  async function handle(f, m) {
    const reply = (value, error) => send(f, { op: 'reply', id: m.id, value, error });
    const fail = (e) => reply(undefined, { message: e.message, code: e.code, name: e.name_, status: e.status });
    const a = m.args || {};
    switch (m.op) {
      case 'ready':
        f.ready = true;
        send(f, { op: 'mount', ui: f.ui, debug });
        return;
      case 'painted':
        f.box.dataset.painted = String(f.ui.version);
        f.box.dataset.paintMs = String(Math.round(performance.now() - f.t0));
        f.box.dataset.paintedAt = String(performance.timeOrigin + performance.now());
        record({ kind: 'render', label: `${f.ui.name} v${f.ui.version} painted` });
        return;
      case 'event':
        record({ kind: 'event', label: `${m.type} at ${f.ui.name}.tsx:${m.src || '?'}` });
        return;
      case 'inspect':
        if (debug) showInspect(f, m);
        return;
      case 'error': {
        record({ kind: 'error', label: `${f.ui.name}: ${m.message}` });
        f.box.dataset.error = m.message;
        try {
          const { json } = await api('POST', '/canvas/errors', { name: f.ui.name, target: f.ui.target, version: f.ui.version, hash: f.ui.hash,
            message: String(m.message || ''), stack: String(m.stack || ''), component_stack: String(m.component_stack || '') });
          if (json && json.line) send(f, { op: 'error-position', position: `${json.line}:${json.column}` });
        } catch (_) { /* the overlay is shown anyway */ }
        return;
      }
      case 'call': {
        if (typeof a.fn !== 'string' || !/^[A-Za-z0-9_-]{1,64}$/.test(a.fn)) return fail(new Error('ichi.call: bad function name'));
        const entry = record({ kind: 'call', label: `${a.fn}(${JSON.stringify(a.args).slice(0, 80)})`, fn: a.fn, args: a.args });
        const run = async (trace) => api('POST', '/fn/' + a.fn + (trace ? '?trace=1' : ''), a.args);
        try {
          let r;
          try { r = await run(debug); entry.traced = debug; } catch (e) {
            if (!(debug && e.status === 403)) throw e;
            r = await run(false); entry.traced = false;
          }
          entry.result = r.json;
          entry.traceId = r.headers.get('x-ichibase-trace-id');
          if (entry.li) entry.li.dataset.traceId = entry.traceId || '';
          reply(r.json);
          if (debug) attachTrace(entry);
        } catch (e) { entry.error = e.message; fail(e); }
        return;
      }
      case 'sql': {
        const entry = record({ kind: 'sql', label: String(a.query).slice(0, 120), query: a.query, params: a.params });
        try {
          const r = await api('POST', sqlUrl(a.params), String(a.query), true);
          entry.result = r.json ? r.json.data : [];
          reply(entry.result);
        } catch (e) { entry.error = e.message; fail(e); }
        return;
      }
      case 'subscribe': {
        const sub = 'f' + (++seq) + '-' + String(a.sub).slice(0, 40);
        const channel = String(a.name).includes(':') || (a.opts && a.opts.channel);
        subs.set(sub, { frame: f, kind: channel ? 'channel' : 'table', name: a.name, frameSub: a.sub });
        f.subs.add(sub);
        if (ws && ws.readyState === 1) ws.send(JSON.stringify(channel ? { type: 'join', channel: a.name, presence: false, ref: sub } : { type: 'subscribe', sub, object: a.name, filter: (a.opts && a.opts.filter) || undefined, ref: sub }));
        reply(true);
        return;
      }
      case 'unsubscribe':
        for (const [k, s] of subs) if (s.frame === f && s.frameSub === a.sub) { unsubscribe(k); f.subs.delete(k); }
        reply(true);
        return;
      case 'rate':
        try {
          const r = await api('POST', '/ai/generations/' + encodeURIComponent(a.generation) + '/feedback', { score: a.score, note: a.note });
          reply(r.json);
        } catch (e) { fail(e); }
        return;
      default:
        return fail(new Error('unknown request ' + m.op));
    }
  }

  window.addEventListener('message', (e) => {
    const f = frameOf(e.source);
    if (!f) return;
    const m = e.data;
    if (!m || m.ichi !== 1 || typeof m.op !== 'string') return;
    handle(f, m);
  });

  // ---- live updates
  function connect() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    ws = new WebSocket(proto + '//' + location.host + '/ws' + (token ? '?access_token=' + encodeURIComponent(token) : ''));
    ws.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      if (m.type === 'hello') {
        if (me) ws.send(JSON.stringify({ type: 'join', channel: 'user:' + me.user_id, presence: false }));
        for (const c of channels) ws.send(JSON.stringify({ type: 'join', channel: c, presence: false }));
        for (const [sub, s] of subs) ws.send(JSON.stringify(s.kind === 'channel' ? { type: 'join', channel: s.name, presence: false } : { type: 'subscribe', sub, object: s.name }));
        setStatus('live');
      } else if (m.type === 'ui' && m.ui) {
        mountUi(m.ui);
      } else if (m.type === 'ui_removed') {
        removeUi(m.name, m.channel);
      } else if (m.type === 'change') {
        const s = subs.get(m.sub);
        if (!s) return;
        record({ kind: 'cdc', label: `${m.op} ${m.table} #${m.change_id}`, result: m.new || m.old });
        send(s.frame, { op: 'event', sub: s.frameSub, event: { op: m.op, table: m.table, key: m.key, old: m.old, new: m.new, change_id: m.change_id } });
      } else if (m.type === 'broadcast') {
        for (const s of subs.values()) if (s.kind === 'channel' && s.name === m.channel) send(s.frame, { op: 'event', sub: s.frameSub, event: m.payload });
      } else if (m.type === 'error') {
        record({ kind: 'error', label: `ws: ${m.message}` });
      }
    };
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onclose = (ev) => {
      if (ev.code === 1008 && /credentials revoked/.test(ev.reason || '')) { setStatus('signed-out: ' + ev.reason); return; }
      if (!opened && token) token = null; // an expired access token: try the session cookie
      setStatus('offline: reconnecting');
      setTimeout(connect, 1000);
    };
  }

  async function start() {
    const { json } = await api('GET', '/canvas/uis' + (channels.length ? '?channels=' + encodeURIComponent(channels.join(',')) : ''));
    me = json;
    body.dataset.user = json.user_id || '';
    for (const ui of json.uis) mountUi(ui);
    connect();
  }

  function signInForm(message) {
    const email = el('input', { id: 'ichi-email', type: 'email', placeholder: 'email', autocomplete: 'username' });
    const password = el('input', { id: 'ichi-password', type: 'password', placeholder: 'password', autocomplete: 'current-password' });
    const err = el('div', { id: 'ichi-signin-error', class: 'ichi-error' }, message || '');
    const form = el('form', { id: 'ichi-signin', class: 'ichi-signin', onsubmit: async (e) => {
      e.preventDefault();
      try {
        const { json } = await api('POST', '/auth/signin', { email: email.value, password: password.value, device: 'canvas' });
        token = json.access_token;
        form.remove();
        await start();
      } catch (x) { err.textContent = x.message; }
    } }, el('h1', null, 'Sign in'), email, password, el('button', { id: 'ichi-signin-button', type: 'submit' }, 'Sign in'), err);
    main.append(form);
    setStatus('signed-out');
  }

  (async () => {
    try {
      const { json } = await api('GET', '/auth/me');
      if (!json || !json.user_id) { signInForm(); return; }
      await start();
    } catch (e) {
      if (e.status === 401 || e.status === 403) signInForm(); else setStatus('error: ' + e.message);
    }
  })();
})();
