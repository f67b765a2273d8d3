// The ichibase console (served at /console, compiled in the server by oxc, React from the
// binary). Sections: Data, Functions, Identity, Activity, Operations. Every call goes to the
// engine's own APIs with the admin's credential (session cookie, access token or API key);
// /console/api/* fills the few gaps (tables with policies, view as a user, run as a user).
import { useState, useEffect, useRef, useMemo, Fragment } from 'react';
import { createRoot } from 'react-dom/client';

// ---------------------------------------------------------------- API
const KEY = 'ichibase-console-credential';
let credential: string | null = sessionStorage.getItem(KEY);
function setCredential(c: string | null) {
  credential = c;
  if (c) sessionStorage.setItem(KEY, c); else sessionStorage.removeItem(KEY);
}

class ApiError extends Error {
  status: number; code: any; errName: any; line: any; body: any;
  constructor(status: number, e: any) {
    super(e.message || ('HTTP ' + status));
    this.status = status; this.code = e.code; this.errName = e.name; this.line = e.line; this.body = e;
  }
}

async function request(method: string, path: string, body?: any, opts: any = {}): Promise<any> {
  const headers: any = { Accept: 'application/json' };
  if (credential) headers['Authorization'] = 'Bearer ' + credential;
  if (opts.raw) headers['Content-Type'] = 'text/plain';
  else if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, credentials: 'same-origin',
    body: opts.raw ? body : body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401 && credential && !credential.startsWith('ik_')) {
    // An expired access token: carry on with the session cookie.
    setCredential(null);
    return request(method, path, body, opts);
  }
  const text = await r.text();
  let json: any = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!r.ok) throw new ApiError(r.status, (json && json.error) || { message: text.trim() || r.statusText });
  return { status: r.status, text, json, headers: r.headers };
}
const api = async (method: string, path: string, body?: any) => (await request(method, path, body)).json;
const enc = encodeURIComponent;

// `{name:Type}` placeholders of a SQL text, in order, once each.
function paramsOf(sql: string): { name: string, type: string }[] {
  const seen = new Set<string>(); const out: any[] = [];
  const re = /\{([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([^}]+)\}/g;
  let m;
  while ((m = re.exec(sql))) if (!seen.has(m[1])) { seen.add(m[1]); out.push({ name: m[1], type: m[2].trim() }); }
  return out;
}

// Run SQL: as the signed-in admin over SQL-over-HTTP, or as another user via /console/api/query-as.
async function runSql(sql: string, o: any = {}): Promise<any> {
  const format = o.format || 'JSONCompact';
  if (o.asUser) {
    const r = await request('POST', '/console/api/query-as', { user: o.asUser, sql, params: o.params || {}, format });
    return { text: r.text, json: format.startsWith('JSON') && !format.includes('EachRow') ? r.json : null, summary: r.headers.get('x-clickhouse-summary') };
  }
  const q = new URLSearchParams({ default_format: format, wait_end_of_query: '1', output_format_json_quote_64bit_integers: '0' });
  if (o.transaction) q.set('transaction', '1');
  for (const [k, v] of Object.entries(o.params || {})) q.set('param_' + k, String(v));
  const r = await request('POST', '/?' + q.toString(), sql, { raw: true });
  let json = null;
  if (/^JSON(Compact)?$/.test(r.headers.get('x-clickhouse-format') || '')) { try { json = JSON.parse(r.text); } catch (_) { json = null; } }
  return { text: r.text, json, summary: r.headers.get('x-clickhouse-summary') };
}

async function analytics(sql: string): Promise<any[][]> {
  const q = new URLSearchParams({ default_format: 'JSONCompact', output_format_json_quote_64bit_integers: '0' });
  const r = await request('POST', '/analytics?' + q.toString(), sql, { raw: true });
  return JSON.parse(r.text).data;
}

const qi = (s: string) => '"' + s.replace(/"/g, '""') + '"';
const show = (v: any) => v === null || v === undefined ? 'NULL' : typeof v === 'object' ? JSON.stringify(v) : String(v);

// ---------------------------------------------------------------- small pieces
function ErrorBox({ error, id }: any) {
  if (!error) return null;
  const e = error as any;
  return <div className="error" role="alert" id={id}>{e.errName ? e.errName + ': ' : ''}{e.message || String(e)}{e.line ? ` (line ${e.line})` : ''}</div>;
}

function useLoad(fn: () => Promise<any>, deps: any[]): [any, any, () => void] {
  const [data, setData] = useState<any>(null);
  const [error, setError] = useState<any>(null);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setError(null);
    fn().then((d) => { if (live) setData(d); }, (e) => { if (live) setError(e); });
    return () => { live = false; };
  }, [...deps, tick]);
  return [data, error, () => setTick((t) => t + 1)];
}

function ResultTable({ meta, data, caption }: any) {
  if (!meta) return null;
  return <div className="scroll"><table className="grid">
    {caption ? <caption className="sr-only">{caption}</caption> : null}
    <thead><tr>{meta.map((m: any, i: number) => <th key={i} scope="col">{m.name}</th>)}</tr></thead>
    <tbody>{data.map((row: any[], i: number) => <tr key={i}>{row.map((v, j) => <td key={j} className={v === null ? 'null' : ''}>{show(v)}</td>)}</tr>)}</tbody>
  </table></div>;
}

function Kv({ obj }: any) {
  return <dl className="kv">{Object.entries(obj || {}).map(([k, v]) => <Fragment key={k}><dt>{k}</dt><dd className="mono">{show(v)}</dd></Fragment>)}</dl>;
}

function UserSelect({ users, value, onChange, id, label }: any) {
  return <label>{label || 'Run as'}<select id={id} value={value} onChange={(e) => onChange(e.target.value)}>
    <option value="">admin (me)</option>
    {(users || []).map((u: any) => <option key={u.id} value={u.id}>{u.email} ({u.role})</option>)}
  </select></label>;
}

// ---------------------------------------------------------------- Lua highlighting and diffs
const LUA_KW = new Set('and break do else elseif end false for function goto if in local nil not or repeat return then true until while'.split(' '));
function luaTokens(src: string): { t: string, k: string }[] {
  const re = /(--\[(=*)\[[\s\S]*?\]\2\]|--[^\n]*)|("(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?|\[(=*)\[[\s\S]*?\]\4\])|(\b0x[0-9a-fA-F]+\b|\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)|([\s\S])/g;
  const out: any[] = []; let m;
  while ((m = re.exec(src))) {
    const k = m[1] ? 'com' : m[3] ? 'str' : m[5] ? 'num' : m[6] ? (LUA_KW.has(m[6]) ? 'kw' : 'id') : '';
    const last = out[out.length - 1];
    if (k === '' && last && last.k === '') last.t += m[0]; else out.push({ t: m[0], k });
  }
  return out;
}
function Highlighted({ src, vars, onVar }: any) {
  return <>{luaTokens(src).map((tk, i) => {
    if (tk.k === 'id' && vars && vars.has(tk.t)) return onVar(tk.t, i);
    return tk.k && tk.k !== 'id' ? <span key={i} className={'tok-' + tk.k}>{tk.t}</span> : <Fragment key={i}>{tk.t}</Fragment>;
  })}</>;
}

function LuaEditor({ value, onChange, id, label }: any) {
  return <div className="editor">
    <pre aria-hidden="true"><Highlighted src={value + '\n'} /></pre>
    <textarea id={id} aria-label={label} spellCheck={false} value={value} onChange={(e) => onChange(e.target.value)}
      onKeyDown={(e) => {
        if (e.key === 'Tab' && !e.shiftKey && !e.ctrlKey) {
          // Indent; Escape first lets Tab leave the editor (keyboard users are not trapped).
          if ((e.target as any).dataset.escaped === '1') return;
          e.preventDefault();
          const t = e.target as HTMLTextAreaElement; const s = t.selectionStart;
          onChange(value.slice(0, s) + '  ' + value.slice(t.selectionEnd));
          requestAnimationFrame(() => t.setSelectionRange(s + 2, s + 2));
        } else if (e.key === 'Escape') (e.target as any).dataset.escaped = '1';
        else (e.target as any).dataset.escaped = '';
      }} />
  </div>;
}

// Line diff (longest common subsequence).
function diffLines(a: string, b: string): { k: string, t: string }[] {
  const x = a.split('\n'), y = b.split('\n');
  const n = x.length, m = y.length;
  if (n * m > 4_000_000) return [...x.map((t) => ({ k: 'del', t })), ...y.map((t) => ({ k: 'add', t }))];
  const L = Array.from({ length: n + 1 }, () => new Int32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out: any[] = []; let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push({ k: 'same', t: x[i] }); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) out.push({ k: 'del', t: x[i++] });
    else out.push({ k: 'add', t: y[j++] });
  }
  while (i < n) out.push({ k: 'del', t: x[i++] });
  while (j < m) out.push({ k: 'add', t: y[j++] });
  return out;
}
function Diff({ a, b, label }: any) {
  const d = useMemo(() => diffLines(a || '', b || ''), [a, b]);
  return <div className="diff" role="region" aria-label={label} tabIndex={0}>{d.map((l, i) => <div key={i} className={l.k}>{l.t}</div>)}</div>;
}

// ---------------------------------------------------------------- charts (inline SVG)
function Chart({ title, labels, series, kind }: any) {
  const W = 600, H = 180, P = 30;
  const max = Math.max(1e-9, ...series.flatMap((s: any) => s.values.map((v: any) => Number(v) || 0)));
  const n = Math.max(1, labels.length);
  const x = (i: number) => P + (i + 0.5) * (W - P - 8) / n;
  const y = (v: number) => H - 18 - (Number(v) || 0) / max * (H - 30);
  const bw = Math.max(1, (W - P - 8) / n / Math.max(1, series.length) - 1);
  const summary = series.map((s: any) => s.name + ': ' + s.values.reduce((a: number, v: any) => a + (Number(v) || 0), 0).toFixed(kind === 'cost' ? 4 : 0)).join(', ');
  return <figure className="card" style={{ margin: 0 }}>
    <figcaption><strong>{title}</strong> <span className="legend">{series.map((s: any) => <Fragment key={s.name}><span style={{ background: s.color }} />{s.name}</Fragment>)}</span></figcaption>
    {labels.length === 0 ? <p className="muted">No data yet.</p> :
      <svg className="chart" viewBox={`0 0 ${W} ${H}`} role="img" aria-label={`${title}. ${summary}`}>
        <line x1={P} y1={H - 18} x2={W} y2={H - 18} stroke="#ccc" />
        <text x={2} y={12}>{Number(max.toPrecision(3))}</text>
        {series.map((s: any, si: number) => kind === 'line'
          ? <polyline key={s.name} fill="none" stroke={s.color} strokeWidth={2} points={s.values.map((v: any, i: number) => `${x(i)},${y(v)}`).join(' ')} />
          : s.values.map((v: any, i: number) => <rect key={s.name + i} x={x(i) - bw * series.length / 2 + si * bw} y={y(v)} width={bw} height={Math.max(0, H - 18 - y(v))} fill={s.color}><title>{labels[i]} {s.name}: {show(v)}</title></rect>))}
        {labels.map((l: string, i: number) => (n <= 12 || i % Math.ceil(n / 12) === 0) ? <text key={i} x={x(i)} y={H - 4} textAnchor="middle">{l}</text> : null)}
      </svg>}
  </figure>;
}

// ---------------------------------------------------------------- sign-in
function SignIn({ onIn, notice }: any) {
  const [mode, setMode] = useState('password');
  const [email, setEmail] = useState(''); const [password, setPassword] = useState(''); const [key, setKey] = useState('');
  const [error, setError] = useState<any>(notice ? { message: notice } : null);
  const [busy, setBusy] = useState(false);
  async function withPasskey() {
    setBusy(true); setError(null);
    try {
      setCredential(null);
      // The passkey ceremony of the devices module (src/auth/passkeys.js), same origin.
      const m = await import('/auth/passkeys.js');
      const r = await m.signInWithPasskey('console');
      setCredential(r.access_token);
      const me = await api('GET', '/auth/me');
      if (me.role !== 'admin') { setCredential(null); await request('POST', '/auth/signout').catch(() => {}); throw new Error(`The console needs the admin role; ${(me.claims && me.claims.email) || 'this identity'} has '${me.role}'.`); }
      onIn(me);
    } catch (e) { setCredential(null); setError(e); }
    setBusy(false);
  }
  async function submit(e: any) {
    e.preventDefault(); setBusy(true); setError(null);
    try {
      if (mode === 'key') {
        setCredential(key.trim());
      } else {
        setCredential(null);
        const r = await api('POST', '/auth/signin', { email, password, device: 'console' });
        setCredential(r.access_token);
      }
      const me = await api('GET', '/auth/me');
      if (me.role !== 'admin') { setCredential(null); if (mode !== 'key') await request('POST', '/auth/signout').catch(() => {}); throw new Error(`The console needs the admin role; ${(me.claims && me.claims.email) || 'this identity'} has '${me.role}'.`); }
      onIn(me);
    } catch (e) { if (mode === 'key') setCredential(null); setError(e); }
    setBusy(false);
  }
  return <main className="signin card" id="signin">
    <h1>ichibase console</h1>
    <div className="tabs" role="tablist" aria-label="Sign-in method">
      <button role="tab" aria-selected={mode === 'password'} id="signin-tab-password" onClick={() => setMode('password')}>Email and password</button>
      <button role="tab" aria-selected={mode === 'key'} id="signin-tab-key" onClick={() => setMode('key')}>API key</button>
    </div>
    <form onSubmit={submit} aria-describedby="signin-error">
      {mode === 'key'
        ? <label>Admin API key<input id="signin-key" type="password" autoComplete="off" required value={key} onChange={(e) => setKey(e.target.value)} /></label>
        : <><label>Email<input id="signin-email" type="email" autoComplete="username" required value={email} onChange={(e) => setEmail(e.target.value)} /></label>
          <label>Password<input id="signin-password" type="password" autoComplete="current-password" required value={password} onChange={(e) => setPassword(e.target.value)} /></label></>}
      <button className="primary" id="signin-submit" type="submit" disabled={busy}>Sign in</button>
      <ErrorBox error={error} id="signin-error" />
    </form>
    <button id="signin-with-passkey" type="button" disabled={busy} onClick={withPasskey}>Sign in with a passkey</button>
  </main>;
}

// ---------------------------------------------------------------- Data
function SqlConsole({ users, onDone }: any) {
  const [sql, setSql] = useState(localStorage.getItem('ichibase-console-sql') || 'SELECT 1');
  const [vals, setVals] = useState<any>({});
  const [format, setFormat] = useState('JSONCompact');
  const [asUser, setAsUser] = useState('');
  const [tx, setTx] = useState(false);
  const [out, setOut] = useState<any>(null);
  const [error, setError] = useState<any>(null);
  const [busy, setBusy] = useState(false);
  const [runs, setRuns] = useState(0);
  const [history, setHistory] = useState<any[]>(() => { try { return JSON.parse(localStorage.getItem('ichibase-console-history') || '[]'); } catch (_) { return []; } });
  const ta = useRef<HTMLTextAreaElement>(null);
  const params = paramsOf(sql);
  async function run() {
    setBusy(true); setError(null); setOut(null);
    localStorage.setItem('ichibase-console-sql', sql);
    const h = [{ sql, at: new Date().toISOString() }, ...history.filter((x) => x.sql !== sql)].slice(0, 50);
    setHistory(h); localStorage.setItem('ichibase-console-history', JSON.stringify(h));
    try {
      const p: any = {}; for (const x of params) p[x.name] = vals[x.name] ?? '';
      const t0 = performance.now();
      const r = await runSql(sql, { params: p, format, asUser, transaction: tx });
      setOut({ ...r, ms: performance.now() - t0 });
      if (onDone) onDone();
    } catch (e: any) {
      setError(e);
      // In place: select the text the error points at.
      const m = /near "([^"]+)"/.exec(e.message || '') || /no such (?:table|column): ([\w.]+)/.exec(e.message || '');
      const at = m ? sql.indexOf(m[1]) : -1;
      if (at >= 0 && ta.current) { ta.current.focus(); ta.current.setSelectionRange(at, at + m![1].length); }
    }
    setBusy(false); setRuns((n) => n + 1);
  }
  return <section className="card" aria-labelledby="sql-h" id="sql" data-runs={runs}>
    <h2 id="sql-h">SQL console</h2>
    <label style={{ display: 'flex' }}>SQL (Ctrl+Enter runs; parameters are written {'{name:Type}'})
      <textarea id="sql-text" ref={ta} rows={6} value={sql} spellCheck={false} aria-invalid={!!error} aria-describedby="sql-error"
        onChange={(e) => setSql(e.target.value)} onKeyDown={(e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } }} /></label>
    <ErrorBox error={error} id="sql-error" />
    {params.length ? <div className="row" id="sql-params">{params.map((p) =>
      <label key={p.name}>{p.name}: {p.type}<input data-param={p.name} value={vals[p.name] ?? ''} onChange={(e) => setVals({ ...vals, [p.name]: e.target.value })} /></label>)}</div> : null}
    <div className="row">
      <label>Format<select id="sql-format" value={format} onChange={(e) => setFormat(e.target.value)}>
        {['JSONCompact', 'JSON', 'JSONEachRow', 'JSONCompactEachRow', 'TabSeparated', 'TabSeparatedWithNames', 'CSV', 'CSVWithNames'].map((f) => <option key={f}>{f}</option>)}
      </select></label>
      <UserSelect users={users} value={asUser} onChange={setAsUser} id="sql-as" label="View as" />
      <label className="inline"><input type="checkbox" checked={tx} onChange={(e) => setTx(e.target.checked)} disabled={!!asUser} />several statements (one transaction)</label>
      <button className="primary" id="sql-run" onClick={run} disabled={busy}>Run</button>
    </div>
    {out ? <div id="sql-result" aria-live="polite">
      <p className="muted">{out.json ? `${out.json.rows} row(s)` : 'done'} in {out.ms.toFixed(0)} ms{asUser ? ' (as ' + ((users || []).find((u: any) => u.id === asUser) || {}).email + ')' : ''}</p>
      {out.json && out.json.meta ? <ResultTable meta={out.json.meta} data={out.json.data.map((r: any) => Array.isArray(r) ? r : out.json.meta.map((m: any) => r[m.name]))} caption="Query result" />
        : <pre className="out">{out.text}</pre>}
    </div> : null}
    <details><summary>History ({history.length})</summary>
      <ul className="list">{history.map((h, i) => <li key={i}><button onClick={() => setSql(h.sql)} title={h.at}><span className="mono">{h.sql.slice(0, 120)}</span></button></li>)}</ul>
    </details>
  </section>;
}

function Browse({ table, users, pageRows, onChanged }: any) {
  const [page, setPage] = useState(0);
  const [sort, setSort] = useState<any>(null);
  const [filterCol, setFilterCol] = useState('');
  const [filter, setFilter] = useState('');
  const [asUser, setAsUser] = useState('');
  const [editing, setEditing] = useState<any>(null);
  const [error, setError] = useState<any>(null);
  const [adding, setAdding] = useState<any>(null);
  useEffect(() => { setPage(0); setSort(null); setFilter(''); setFilterCol(''); setEditing(null); setAdding(null); }, [table.name]);
  const user = (users || []).find((u: any) => u.id === asUser);
  // As a user, a table behind policies is read through its policy view for the user's role.
  const policy = user && table.policies.length ? (table.policies.find((p: any) => (p.roles || []).includes(user.role)) || table.policies[0]) : null;
  const target = policy ? policy.name : table.name;
  const editable = !asUser && table.rowid;
  const [res, err, reload] = useLoad(async () => {
    const cols = table.columns.map((c: any) => c.name);
    const where = filter && filterCol ? ` WHERE CAST(${qi(filterCol)} AS TEXT) LIKE {f:String}` : filter ? ` WHERE (${cols.map((c: string) => `CAST(${qi(c)} AS TEXT) LIKE {f:String}`).join(' OR ') || '1'})` : '';
    const order = sort ? ` ORDER BY ${qi(sort.col)} ${sort.desc ? 'DESC' : 'ASC'}` : editable ? ' ORDER BY rowid' : '';
    const sql = `SELECT ${editable ? 'rowid AS _rowid_, ' : ''}* FROM ${qi(target)}${where}${order} LIMIT {lim:Int64} OFFSET {off:Int64}`;
    const params: any = { lim: pageRows + 1, off: page * pageRows };
    if (filter) params.f = '%' + filter + '%';
    return (await runSql(sql, { params, asUser })).json;
  }, [table.name, page, sort && sort.col, sort && sort.desc, filter, filterCol, asUser, target]);
  async function write(sql: string, params: any) {
    setError(null);
    try { await runSql(sql, { params }); reload(); onChanged(); return true; } catch (e) { setError(e); return false; }
  }
  const meta = res ? res.meta : null;
  const rows = res ? res.data.slice(0, pageRows) : [];
  const more = res && res.data.length > pageRows;
  const ridx = meta ? meta.findIndex((m: any) => m.name === '_rowid_') : -1;
  return <section className="card" aria-labelledby="browse-h">
    <h2 id="browse-h">{table.type === 'view' ? 'View' : 'Table'} {table.name} <span className="muted">{table.rows != null ? table.rows + ' rows' : ''}</span></h2>
    <div className="row">
      <UserSelect users={users} value={asUser} onChange={(v: string) => { setAsUser(v); setPage(0); }} id="browse-as" label="View as user" />
      <label>Filter column<select id="browse-filter-col" value={filterCol} onChange={(e) => setFilterCol(e.target.value)}>
        <option value="">any column</option>{table.columns.map((c: any) => <option key={c.name}>{c.name}</option>)}</select></label>
      <label>Contains<input id="browse-filter" type="search" value={filter} onChange={(e) => { setFilter(e.target.value); setPage(0); }} /></label>
      {editable ? <button id="browse-add" onClick={() => setAdding({})}>Add row</button> : null}
    </div>
    {user ? <p className="muted" id="browse-as-note">Showing what {user.email} ({user.role}) sees{policy ? ` through policy view ${policy.name}` : ''}: the query ran with their identity.</p> : null}
    <ErrorBox error={err || error} id="browse-error" />
    {adding ? <form className="card" aria-label="New row" onSubmit={async (e) => {
      e.preventDefault();
      const cols = Object.keys(adding).filter((k) => adding[k] !== '');
      const ok = await write(cols.length ? `INSERT INTO ${qi(table.name)} (${cols.map(qi).join(', ')}) VALUES (${cols.map((_, i) => `{v${i}:String}`).join(', ')})` : `INSERT INTO ${qi(table.name)} DEFAULT VALUES`,
        Object.fromEntries(cols.map((c, i) => ['v' + i, adding[c]])));
      if (ok) setAdding(null);
    }}><div className="row">{table.columns.map((c: any) => <label key={c.name}>{c.name} <span className="muted">{c.type}</span><input data-col={c.name} value={adding[c.name] || ''} onChange={(e) => setAdding({ ...adding, [c.name]: e.target.value })} /></label>)}</div>
      <div className="row"><button className="primary" type="submit" id="browse-add-save">Insert</button><button type="button" onClick={() => setAdding(null)}>Cancel</button></div></form> : null}
    {meta ? <div className="scroll"><table className="grid" id="browse-table" aria-label={`Rows of ${target}`}>
      <thead><tr>{meta.map((m: any, i: number) => i === ridx ? null : <th key={i} scope="col" aria-sort={sort && sort.col === m.name ? (sort.desc ? 'descending' : 'ascending') : 'none'}>
        <button onClick={() => setSort(sort && sort.col === m.name ? { col: m.name, desc: !sort.desc } : { col: m.name, desc: false })}>{m.name}{sort && sort.col === m.name ? (sort.desc ? ' ▼' : ' ▲') : ''}</button></th>)}
        {editable ? <th scope="col"><span className="sr-only">Actions</span></th> : null}</tr></thead>
      <tbody>{rows.map((r: any[], i: number) => <tr key={i}>{r.map((v, j) => {
        if (j === ridx) return null;
        const col = meta[j].name;
        const isEd = editing && editing.row === r[ridx] && editing.col === col;
        if (isEd) return <td key={j}><input autoFocus aria-label={`New value of ${col}`} value={editing.value} onChange={(e) => setEditing({ ...editing, value: e.target.value })}
          onKeyDown={async (e) => {
            if (e.key === 'Escape') setEditing(null);
            if (e.key === 'Enter') { if (await write(`UPDATE ${qi(table.name)} SET ${qi(col)} = {v:Nullable(String)} WHERE rowid = {r:Int64}`, { v: editing.value, r: editing.row })) setEditing(null); }
          }} /></td>;
        return <td key={j} className={v === null ? 'null' : ''} tabIndex={editable ? 0 : undefined} title={editable ? 'Double-click or Enter to edit (\\N is NULL)' : undefined}
          onDoubleClick={() => editable && setEditing({ row: r[ridx], col, value: v === null ? '\\N' : show(v) })}
          onKeyDown={(e) => { if (editable && e.key === 'Enter') setEditing({ row: r[ridx], col, value: v === null ? '\\N' : show(v) }); }}>{show(v)}</td>;
      })}{editable ? <td><button className="danger" aria-label={`Delete row ${r[ridx]}`} onClick={() => { if (confirm('Delete this row?')) write(`DELETE FROM ${qi(table.name)} WHERE rowid = {r:Int64}`, { r: r[ridx] }); }}>Delete</button></td> : null}</tr>)}</tbody>
    </table></div> : null}
    <div className="row"><button onClick={() => setPage(page - 1)} disabled={page === 0}>Previous</button><span className="muted" aria-live="polite">Page {page + 1}</span><button onClick={() => setPage(page + 1)} disabled={!more}>Next</button></div>
    <h3>Policies</h3>
    {table.policies.length === 0 ? <p className="muted">{table.policy_of ? `This view is policy ${table.policy_of === table.name ? '' : 'of table ' + table.policy_of}.` : 'No row-level security policy on this table.'}</p> :
      <ul>{table.policies.map((p: any) => <li key={p.name}><strong>{p.name}</strong> for {(p.roles || []).join(', ')} ({(p.operations || []).join(', ')}): <code>USING {p.using}</code>{p.check && p.check !== p.using ? <> <code>CHECK {p.check}</code></> : null}</li>)}</ul>}
    <h3>Grants</h3>
    {table.grants.length === 0 ? <p className="muted">Not granted to any role.</p> : <ul>{table.grants.map((g: any) => <li key={g.role}>{g.role}: {g.privileges.join(', ')}</li>)}</ul>}
  </section>;
}

function Data({ users, pageRows }: any) {
  const [sel, setSel] = useState<string | null>(null);
  const [tables, err, reload] = useLoad(() => api('GET', '/console/api/tables').then((r) => r.tables), []);
  const table = (tables || []).find((t: any) => t.name === sel);
  return <div className="split">
    <nav aria-label="Tables and views">
      <h2>Tables and views</h2>
      <ErrorBox error={err} />
      <ul className="list" id="tables">{(tables || []).map((t: any) => <li key={t.name}><button aria-current={sel === t.name} data-table={t.name} onClick={() => setSel(t.name)}>
        {t.name} <span className="muted">{t.type === 'view' ? (t.policy_of ? 'policy view' : 'view') : t.rows + ' rows'}{t.policies.length ? ' · RLS' : ''}</span></button></li>)}</ul>
      <div className="row"><button onClick={reload}>Refresh</button></div>
    </nav>
    <div style={{ minWidth: 0 }}>
      {table ? <Browse table={table} users={users} pageRows={pageRows} onChanged={reload} /> : <p className="muted">Pick a table, or run SQL below.</p>}
      <SqlConsole users={users} onDone={reload} />
    </div>
  </div>;
}

// ---------------------------------------------------------------- Functions
function TraceView({ id, source }: any) {
  const [t, err] = useLoad(() => api('GET', '/trace/' + enc(id)), [id]);
  const [tip, setTip] = useState<any>(null);
  const cache = useRef<Map<string, any>>(new Map());
  const vars = useMemo(() => {
    const s = new Set<string>();
    for (const st of (t && t.steps) || []) { for (const k of Object.keys(st.locals || {})) s.add(k); for (const k of Object.keys(st.upvalues || {})) s.add(k); }
    return s;
  }, [t]);
  // A recorded step stands for itself and the visits of its line sampling skipped before it.
  const hits = useMemo(() => { const h: any = {}; for (const st of (t && t.steps) || []) h[st.line] = (h[st.line] || 0) + 1 + (st.skipped || 0); return h; }, [t]);
  async function hover(name: string, line: number, el: HTMLElement) {
    const r = el.getBoundingClientRect();
    const place = { left: Math.min(r.left, window.innerWidth - 260), top: r.bottom + 6 };
    setTip({ ...place, name, text: '…' });
    try {
      let h = cache.current.get(name);
      if (!h) { h = await api('GET', `/trace/${enc(id)}/hover?name=${enc(name)}`); cache.current.set(name, h); }
      const hist = h.history || [];
      // The value after this line ran (its last change at or before the line's last step), else the last one.
      const stepsHere = ((t && t.steps) || []).filter((s: any) => s.line === line).map((s: any) => s.step);
      const lastHere = stepsHere.length ? Math.max(...stepsHere) : Infinity;
      const at = [...hist].reverse().find((x: any) => x.step <= lastHere) || hist[hist.length - 1];
      const text = at ? `${name} = ${JSON.stringify(at.value)}  (${at.scope}, line ${at.line}, step ${at.step})` + (hist.length > 1 ? `\nchanges: ${hist.map((x: any) => 'line ' + x.line + ': ' + JSON.stringify(x.value)).join('; ').slice(0, 400)}` : '') : `${name}: no value recorded`;
      setTip((cur: any) => cur && cur.name === name ? { ...place, name, text } : cur);
    } catch (e: any) { setTip({ ...place, name, text: e.message }); }
  }
  if (err) return <ErrorBox error={err} />;
  if (!t) return <p className="muted">Loading the trace…</p>;
  const lines = (source || '').split('\n');
  return <section className="card" aria-labelledby="trace-h" id="trace">
    <h3 id="trace-h">Trace {id.slice(0, 12)}… <span className={'badge ' + (t.trace.outcome === 'ok' ? 'ok' : 'bad')}>{t.trace.outcome}</span></h3>
    <p className="muted">{t.trace.steps} steps, {t.trace.instructions} instructions, {Number(t.trace.elapsed_ms).toFixed(1)} ms, run as {t.trace.role}{t.trace.user_id ? ' ' + t.trace.user_id : ''}. Hover or focus a <span className="var">variable</span> to see its value.</p>
    {t.trace.sampling ? <p className="muted" id="trace-sampling">Hot lines sampled: {t.trace.sampling.skipped} line visits not recorded (after {t.trace.sampling.after} recorded visits of a line, only every 2^j-th more is); a step's “skipped” counts its line's visits left out before it.</p> : null}
    {t.trace.error ? <div className="error">{t.trace.error}{t.trace.error_line ? ` (line ${t.trace.error_line})` : ''}</div> : null}
    <div className="code-lines" id="trace-source">{lines.map((l: string, i: number) => <div key={i} className={hits[i + 1] ? 'hit' : ''}>
      <span className="ln">{i + 1}</span><span className="hits" aria-label={hits[i + 1] ? `ran ${hits[i + 1]} times` : undefined}>{hits[i + 1] ? '×' + hits[i + 1] : ''}</span>
      <Highlighted src={l} vars={vars} onVar={(name: string, k: number) => <span key={k} className="var" tabIndex={0} data-var={name} data-line={i + 1} role="button" aria-describedby={tip && tip.name === name ? 'trace-tip' : undefined}
        onMouseEnter={(e) => hover(name, i + 1, e.currentTarget)} onFocus={(e) => hover(name, i + 1, e.currentTarget)}
        onMouseLeave={() => setTip(null)} onBlur={() => setTip(null)}>{name}</span>} />
    </div>)}</div>
    {tip ? <div className="tip" role="tooltip" id="trace-tip" style={{ left: tip.left, top: tip.top }}>{tip.text}</div> : null}
    {t.trace.logs && t.trace.logs.length ? <><h3>Logs</h3><pre className="out">{t.trace.logs.map((l: any) => JSON.stringify(l)).join('\n')}</pre></> : null}
    <details><summary>Steps ({t.steps.length})</summary><div className="scroll"><table className="grid"><thead><tr><th>step</th><th>line</th><th>function</th><th>skipped</th><th>locals</th><th>upvalues</th></tr></thead>
      <tbody>{t.steps.slice(0, 500).map((s: any) => <tr key={s.step}><td>{s.step}</td><td>{s.line}</td><td>{s.function}</td><td>{s.skipped || ''}</td><td className="mono">{JSON.stringify(s.locals)}</td><td className="mono">{JSON.stringify(s.upvalues)}</td></tr>)}</tbody></table></div></details>
  </section>;
}

const TEMPLATE = `return function(input, ctx)
  local rows = db.query("SELECT 1 AS one")
  return {user = ctx.user_id, rows = rows, input = input}
end
`;

function FnEditor({ name, users, isNew, onDeployed }: any) {
  const [src, setSrc] = useState(isNew ? TEMPLATE : '');
  const [live, setLive] = useState<any>(null);
  const [msg, setMsg] = useState<any>(null);
  const [error, setError] = useState<any>(null);
  const [traceAll, setTraceAll] = useState(false);
  const [asUser, setAsUser] = useState('');
  const [input, setInput] = useState('{}');
  const [run, setRun] = useState<any>(null);
  const [diff, setDiff] = useState<any>(null);
  const [versions, verr, reloadVersions] = useLoad(() => isNew && !live ? Promise.resolve([]) : api('GET', `/fn/${enc(name)}/versions`).then((r) => r.versions), [name, live && live.version]);
  useEffect(() => {
    setRun(null); setDiff(null); setMsg(null); setError(null);
    if (!isNew) api('GET', '/fn/' + enc(name)).then((f) => { setLive(f); setSrc(f.source); setTraceAll(!!f.trace); }, setError);
  }, [name]);
  async function deploy() {
    setError(null); setMsg(null);
    try {
      const r = (await request('PUT', `/fn/${enc(name)}${traceAll ? '?trace=1' : ''}`, src, { raw: true })).json;
      setMsg(`Deployed version ${r.version}.`);
      const f = await api('GET', '/fn/' + enc(name)); setLive(f); onDeployed(); reloadVersions();
    } catch (e) { setError(e); }
  }
  async function doRun() {
    setError(null); setRun(null);
    let inp;
    try { inp = input.trim() ? JSON.parse(input) : null; } catch (e: any) { setError({ message: 'The input is not JSON: ' + e.message }); return; }
    try {
      const r = await api('POST', '/console/api/run', { function: name, user: asUser || null, input: inp });
      const f = await api('GET', `/fn/${enc(name)}?version=${r.version}`);
      setRun({ ...r, source: f.source });
    } catch (e) { setError(e); }
  }
  return <section className="card" aria-labelledby="fn-h">
    <h2 id="fn-h">Function {name} {live ? <span className="muted">live version {live.version}</span> : null}</h2>
    <LuaEditor id="fn-source" label={`Source of ${name}`} value={src} onChange={setSrc} />
    <div className="row">
      <label className="inline"><input type="checkbox" checked={traceAll} onChange={(e) => setTraceAll(e.target.checked)} />trace every call</label>
      <button className="primary" id="fn-deploy" onClick={deploy}>Deploy</button>
      {msg ? <span className="okmsg" role="status" id="fn-msg">{msg}</span> : null}
    </div>
    <ErrorBox error={error} id="fn-error" />
    <h3>Run</h3>
    <div className="row">
      <UserSelect users={users} value={asUser} onChange={setAsUser} id="fn-as" />
      <label style={{ flex: '1 1 16rem' }}>Input (JSON)<textarea id="fn-input" rows={3} value={input} onChange={(e) => setInput(e.target.value)} /></label>
      <button className="primary" id="fn-run" onClick={doRun} disabled={!live}>Run with trace</button>
    </div>
    {run ? <div id="fn-run-result" aria-live="polite">
      <p>{run.ok ? <span className="badge ok">ok</span> : <span className="badge bad">error</span>} version {run.version}, {Number(run.elapsed_ms).toFixed(1)} ms, as {run.role}</p>
      <pre className="out" id="fn-output">{JSON.stringify(run.ok ? run.result : run.error, null, 2)}</pre>
      <TraceView id={run.trace_id} source={run.source} />
    </div> : null}
    <h3>Versions</h3>
    <ErrorBox error={verr} />
    <div className="scroll"><table className="grid" id="fn-versions"><thead><tr><th>version</th><th>created</th><th>by</th><th>bytes</th><th><span className="sr-only">Actions</span></th></tr></thead>
      <tbody>{(versions || []).slice().reverse().map((v: any) => <tr key={v.version}><td>{v.version}{v.live ? ' (live)' : ''}</td><td>{v.created_at}</td><td>{v.created_by || ''}</td><td>{v.bytes}</td>
        <td><button onClick={async () => { try { const f = await api('GET', `/fn/${enc(name)}?version=${v.version}`); setDiff({ v: v.version, a: f.source, b: src }); } catch (e) { setError(e); } }}>Diff with editor</button>{' '}
          {!v.live ? <button onClick={async () => { try { await api('POST', `/fn/${enc(name)}/rollback`, { version: v.version }); const f = await api('GET', '/fn/' + enc(name)); setLive(f); setSrc(f.source); setMsg(`Rolled back to version ${v.version}.`); onDeployed(); } catch (e) { setError(e); } }}>Roll back to this</button> : null}</td></tr>)}</tbody></table></div>
    {diff ? <><p className="muted">Version {diff.v} (−) → the editor (+)</p><Diff a={diff.a} b={diff.b} label={`Diff of version ${diff.v} and the editor`} /></> : null}
  </section>;
}

function Functions({ users }: any) {
  const [sel, setSel] = useState<any>(null);
  const [newName, setNewName] = useState('');
  const [fns, err, reload] = useLoad(() => api('GET', '/fn').then((r) => r.functions), []);
  return <div className="split">
    <nav aria-label="Functions">
      <h2>Functions</h2>
      <ErrorBox error={err} />
      <ul className="list" id="functions">{(fns || []).map((f: any) => <li key={f.name}><button aria-current={sel && sel.name === f.name} data-fn={f.name} onClick={() => setSel({ name: f.name })}>{f.name} <span className="muted">v{f.version}{f.trace ? ' · traced' : ''}</span></button></li>)}</ul>
      <form className="row" onSubmit={(e) => { e.preventDefault(); if (newName.trim()) setSel({ name: newName.trim(), isNew: true }); }}>
        <label>New function<input id="fn-new-name" value={newName} onChange={(e) => setNewName(e.target.value)} pattern="[A-Za-z_][A-Za-z0-9_\-]*" /></label>
        <button type="submit" id="fn-new">New</button>
      </form>
    </nav>
    <div style={{ minWidth: 0 }}>{sel ? <FnEditor key={sel.name + (sel.isNew ? ':new' : '')} name={sel.name} isNew={sel.isNew} users={users} onDeployed={reload} /> : <p className="muted">Pick a function or create one.</p>}</div>
  </div>;
}

// ---------------------------------------------------------------- Identity
function Identity({ me, reloadUsers, users }: any) {
  const [error, setError] = useState<any>(null);
  const [newKey, setNewKey] = useState<any>(null);
  const [keys, kerr, reloadKeys] = useLoad(() => api('GET', '/admin/keys').then((r) => r.keys), []);
  const [sessions, serr, reloadSessions] = useLoad(() => runSql(`SELECT s.id, u.email, s.device, s.created_at, s.last_used_at, datetime(s.expires_at, 'unixepoch') AS expires, s.revoked_at FROM _ichibase_sessions s JOIN _ichibase_users u ON u.id = s.user_id ORDER BY s.created_at DESC LIMIT 200`).then((r) => r.json.data), []);
  const [policies, perr, reloadPolicies] = useLoad(() => api('GET', '/admin/policies').then((r) => r.policies), []);
  const [grants, gerr, reloadGrants] = useLoad(() => api('GET', '/admin/grants').then((r) => r.grants), []);
  const [f, setF] = useState<any>({ email: '', password: '', role: 'user', keyName: '', keyRole: 'user', pName: '', pTable: '', pRoles: 'user', pUsing: '', gObject: '', gRole: 'user', gPriv: 'select' });
  const set = (k: string) => (e: any) => setF({ ...f, [k]: e.target.value });
  const act = (fn: () => Promise<any>, after: () => void) => async (e?: any) => { if (e && e.preventDefault) e.preventDefault(); setError(null); try { await fn(); after(); } catch (x) { setError(x); } };
  return <div>
    <ErrorBox error={error} id="identity-error" />
    <section className="card" aria-labelledby="users-h"><h2 id="users-h">Users</h2>
      <div className="scroll"><table className="grid" id="users"><thead><tr><th>email</th><th>id</th><th>role</th><th>created</th><th>state</th></tr></thead>
        <tbody>{(users || []).map((u: any) => <tr key={u.id}><td>{u.email}</td><td className="mono">{u.id}</td>
          <td><select aria-label={`Role of ${u.email}`} value={u.role} onChange={(e) => act(() => api('PATCH', '/admin/users/' + enc(u.id), { role: e.target.value }), reloadUsers)()}>
            {Array.from(new Set(['user', 'admin', u.role])).map((r) => <option key={r}>{r}</option>)}</select></td>
          <td>{u.created_at}</td><td><button onClick={act(() => api('PATCH', '/admin/users/' + enc(u.id), { disabled: !u.disabled }), reloadUsers)}>{u.disabled ? 'Enable' : 'Disable'}</button></td></tr>)}</tbody></table></div>
      <form className="row" onSubmit={act(() => api('POST', '/admin/users', { email: f.email, password: f.password, role: f.role }), reloadUsers)}>
        <label>Email<input type="email" required value={f.email} onChange={set('email')} /></label>
        <label>Password<input type="password" required value={f.password} onChange={set('password')} autoComplete="new-password" /></label>
        <label>Role<input value={f.role} onChange={set('role')} /></label><button type="submit">Create user</button></form>
    </section>
    <section className="card" aria-labelledby="keys-h"><h2 id="keys-h">API keys</h2><ErrorBox error={kerr} />
      {newKey ? <p role="status">New key (shown once): <code id="new-key">{newKey}</code></p> : null}
      <div className="scroll"><table className="grid" id="keys"><thead><tr><th>name</th><th>role</th><th>user</th><th>created</th><th>state</th></tr></thead>
        <tbody>{(keys || []).map((k: any) => <tr key={k.id}><td>{k.name}</td><td>{k.role}</td><td className="mono">{k.user_id || ''}</td><td>{k.created_at}</td>
          <td>{k.revoked ? 'revoked' : <button className="danger" data-revoke-key={k.name} onClick={act(() => api('DELETE', '/admin/keys/' + enc(k.id)), reloadKeys)}>Revoke</button>}</td></tr>)}</tbody></table></div>
      <form className="row" onSubmit={act(async () => { const r = await api('POST', '/admin/keys', { name: f.keyName, role: f.keyRole }); setNewKey(r.key); }, reloadKeys)}>
        <label>Name<input id="key-name" required value={f.keyName} onChange={set('keyName')} /></label><label>Role<input id="key-role" required value={f.keyRole} onChange={set('keyRole')} /></label><button type="submit" id="key-create">Create key</button></form>
    </section>
    <section className="card" aria-labelledby="sessions-h"><h2 id="sessions-h">Sessions</h2><ErrorBox error={serr} />
      <div className="scroll"><table className="grid"><thead><tr><th>email</th><th>device</th><th>created</th><th>last used</th><th>expires</th><th>state</th></tr></thead>
        <tbody>{(sessions || []).map((s: any[]) => <tr key={s[0]}><td>{s[1]}</td><td>{s[2] || ''}</td><td>{s[3]}</td><td>{s[4] || ''}</td><td>{s[5]}</td>
          <td>{s[6] ? 'revoked' : me.user_id ? <button className="danger" onClick={act(() => api('DELETE', '/auth/sessions/' + enc(s[0])), reloadSessions)}>Revoke</button> : 'active'}</td></tr>)}</tbody></table></div>
    </section>
    <section className="card" aria-labelledby="policies-h"><h2 id="policies-h">Policies</h2><ErrorBox error={perr} />
      <ul>{(policies || []).map((p: any) => <li key={p.name}><strong>{p.name}</strong> on {p.table} for {(p.roles || []).join(', ')}: <code>{p.using}</code> <button className="danger" onClick={act(() => api('DELETE', '/admin/policies/' + enc(p.name)), reloadPolicies)}>Drop</button></li>)}</ul>
      <form className="row" onSubmit={act(() => api('POST', '/admin/policies', { name: f.pName, table: f.pTable, roles: f.pRoles.split(',').map((s: string) => s.trim()).filter(Boolean), using: f.pUsing }), reloadPolicies)}>
        <label>Name (the view)<input required value={f.pName} onChange={set('pName')} /></label><label>Table<input required value={f.pTable} onChange={set('pTable')} /></label>
        <label>Roles<input value={f.pRoles} onChange={set('pRoles')} /></label><label style={{ flex: '1 1 14rem' }}>Using<input required value={f.pUsing} onChange={set('pUsing')} placeholder="owner = auth_userid()" /></label><button type="submit">Create policy</button></form>
    </section>
    <section className="card" aria-labelledby="grants-h"><h2 id="grants-h">Grants</h2><ErrorBox error={gerr} />
      <ul>{(grants || []).map((g: any, i: number) => <li key={i}>{g.object} → {g.role}: {(g.privileges || [g.privilege]).join(', ')} <button className="danger" onClick={act(() => api('DELETE', `/admin/grants?object=${enc(g.object)}&role=${enc(g.role)}`), reloadGrants)}>Revoke</button></li>)}</ul>
      <form className="row" onSubmit={act(() => api('POST', '/admin/grants', { object: f.gObject, role: f.gRole, privileges: f.gPriv.split(',').map((s: string) => s.trim()).filter(Boolean) }), reloadGrants)}>
        <label>Object<input required value={f.gObject} onChange={set('gObject')} /></label><label>Role<input required value={f.gRole} onChange={set('gRole')} /></label>
        <label>Privileges<input value={f.gPriv} onChange={set('gPriv')} /></label><button type="submit">Grant</button></form>
    </section>
  </div>;
}

// ---------------------------------------------------------------- Activity
const LISTS: any = {
  requests: ['Requests', `SELECT strftime(ts, '%H:%M:%S') AS time, method, path, status, round(latency_ms, 1) AS ms, role, user_id FROM http_requests ORDER BY ts DESC LIMIT 100`],
  statements: ['Statements', `SELECT strftime(s.ts, '%H:%M:%S') AS time, s.verb, s.outcome, s.rows, round(s.elapsed_ms, 2) AS ms, s.role, left(t.text, 200) AS sql FROM sql_statements s LEFT JOIN (SELECT hash, any_value(text) AS text FROM sql_texts GROUP BY hash) t ON t.hash = s.hash ORDER BY s.ts DESC LIMIT 100`],
  lua: ['Lua invocations', `SELECT strftime(ts, '%H:%M:%S') AS time, function, version, outcome, error, round(elapsed_ms, 2) AS ms, cpu_ms, memory, role, user_id, trace_id FROM lua_invocations ORDER BY ts DESC LIMIT 100`],
  ai: ['Model calls', `SELECT strftime(ts, '%H:%M:%S') AS time, model, outcome, input_tokens, output_tokens, purpose, generation, round, round(elapsed_ms) AS ms FROM ai_calls ORDER BY ts DESC LIMIT 100`],
};
function ts(d: Date) { return d.toISOString().slice(0, 19).replace('T', ' '); }
function Activity() {
  const [minutes, setMinutes] = useState(60);
  const [list, setList] = useState('requests');
  const [tick, setTick] = useState(0);
  const [auto, setAuto] = useState(false);
  const [box, setBox] = useState(`SELECT kind, count(*) AS events FROM log_all GROUP BY kind ORDER BY events DESC`);
  const [boxOut, setBoxOut] = useState<any>(null);
  const [boxErr, setBoxErr] = useState<any>(null);
  useEffect(() => { if (!auto) return; const t = setInterval(() => setTick((x) => x + 1), 5000); return () => clearInterval(t); }, [auto]);
  const since = `TIMESTAMP '${ts(new Date(Date.now() - minutes * 60000))}'`;
  const bucket = minutes <= 120 ? 'minute' : 'hour';
  const [perMin, e1] = useLoad(() => analytics(`SELECT strftime(date_trunc('${bucket}', ts), '${bucket === 'minute' ? '%H:%M' : '%d %H:00'}') AS m, count(*) AS requests, count(*) FILTER (WHERE status >= 400) AS errors,
      round(quantile_cont(latency_ms, 0.5), 2) AS p50, round(quantile_cont(latency_ms, 0.95), 2) AS p95, round(quantile_cont(latency_ms, 0.99), 2) AS p99
      FROM http_requests WHERE ts > ${since} GROUP BY date_trunc('${bucket}', ts) ORDER BY date_trunc('${bucket}', ts)`), [minutes, tick]);
  const [perDay, e2] = useLoad(() => analytics(`SELECT strftime(date_trunc('day', ts), '%m-%d') AS d, round(sum(coalesce(CAST(detail->>'total_cost' AS DOUBLE), 0)), 6) AS cost, count(*) AS calls
      FROM log_all WHERE kind = 'ai' AND ts > TIMESTAMP '${ts(new Date(Date.now() - 30 * 86400000))}' GROUP BY date_trunc('day', ts) ORDER BY date_trunc('day', ts)`), [tick]);
  const [perFn, e3] = useLoad(() => analytics(`SELECT coalesce(detail->>'function', detail->>'purpose', '(none)') AS f, round(sum(coalesce(CAST(detail->>'total_cost' AS DOUBLE), 0)), 6) AS cost, count(*) AS calls
      FROM log_all WHERE kind = 'ai' GROUP BY 1 ORDER BY cost DESC, calls DESC LIMIT 20`), [tick]);
  const [archive, e4] = useLoad(() => analytics(`SELECT strftime(date_trunc('month', day), '%Y-%m') AS m, sum(bytes) AS bytes, sum(rows) AS rows, count(*) AS files FROM archive_files GROUP BY 1 ORDER BY 1`), [tick]);
  const [rows, e5] = useLoad(async () => {
    const q = new URLSearchParams({ default_format: 'JSONCompact', output_format_json_quote_64bit_integers: '0' });
    return JSON.parse((await request('POST', '/analytics?' + q, LISTS[list][1], { raw: true })).text);
  }, [list, tick]);
  const col = (d: any, i: number) => (d || []).map((r: any[]) => r[i]);
  async function runBox() {
    setBoxErr(null); setBoxOut(null);
    const q = new URLSearchParams({ default_format: 'JSONCompact', output_format_json_quote_64bit_integers: '0' });
    try { setBoxOut(JSON.parse((await request('POST', '/analytics?' + q, box, { raw: true })).text)); } catch (e) { setBoxErr(e); }
  }
  return <div>
    <div className="row">
      <label>Window<select id="activity-window" value={minutes} onChange={(e) => setMinutes(Number(e.target.value))}>
        <option value={15}>15 minutes</option><option value={60}>1 hour</option><option value={1440}>24 hours</option><option value={10080}>7 days</option></select></label>
      <button id="activity-refresh" onClick={() => setTick(tick + 1)}>Refresh</button>
      <label className="inline"><input type="checkbox" checked={auto} onChange={(e) => setAuto(e.target.checked)} />every 5 s</label>
    </div>
    <ErrorBox error={e1 || e2 || e3 || e4} />
    <div className="charts">
      <Chart title={`Requests and errors per ${bucket}`} labels={col(perMin, 0)} series={[{ name: 'requests', color: '#1f5fbf', values: col(perMin, 1) }, { name: 'errors', color: '#b3261e', values: col(perMin, 2) }]} />
      <Chart kind="line" title="Latency percentiles (ms)" labels={col(perMin, 0)} series={[{ name: 'p50', color: '#1b7a3a', values: col(perMin, 3) }, { name: 'p95', color: '#b55300', values: col(perMin, 4) }, { name: 'p99', color: '#b3261e', values: col(perMin, 5) }]} />
      <Chart kind="cost" title="Model cost per day (USD)" labels={col(perDay, 0)} series={[{ name: 'cost', color: '#7a1fa2', values: col(perDay, 1) }]} />
      <Chart kind="cost" title="Model cost per function (USD)" labels={col(perFn, 0)} series={[{ name: 'cost', color: '#7a1fa2', values: col(perFn, 1) }]} />
      <Chart title="Archive size by month (bytes)" labels={col(archive, 0)} series={[{ name: 'bytes', color: '#1f5fbf', values: col(archive, 1) }]} />
    </div>
    <section className="card" aria-labelledby="log-h"><h2 id="log-h">Log</h2>
      <div className="tabs" role="tablist" aria-label="Kind of event">{Object.keys(LISTS).map((k) => <button key={k} role="tab" aria-selected={list === k} data-list={k} onClick={() => setList(k)}>{LISTS[k][0]}</button>)}</div>
      <ErrorBox error={e5} />
      {rows ? <div id="activity-list"><ResultTable meta={rows.meta} data={rows.data} caption={LISTS[list][0]} /></div> : null}
    </section>
    <section className="card" aria-labelledby="an-h"><h2 id="an-h">Analytics SQL (DuckDB)</h2>
      <label style={{ display: 'flex' }}>Query over log_all, http_requests, sql_statements, lua_invocations, ai_calls, app_table('name')…
        <textarea id="analytics-text" rows={4} value={box} onChange={(e) => setBox(e.target.value)} onKeyDown={(e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runBox(); } }} /></label>
      <div className="row"><button className="primary" id="analytics-run" onClick={runBox}>Run</button></div>
      <ErrorBox error={boxErr} />
      {boxOut ? <ResultTable meta={boxOut.meta} data={boxOut.data} caption="Analytics result" /> : null}
    </section>
  </div>;
}

// ---------------------------------------------------------------- Operations
function Generation({ id, onDecided }: any) {
  const [g, err, reload] = useLoad(() => api('GET', '/generate/' + enc(id)), [id]);
  const [lives, setLives] = useState<any>({});
  const [error, setError] = useState<any>(null);
  const [done, setDone] = useState<any>(null);
  useEffect(() => {
    if (!g || !g.bundle) return;
    Promise.all((g.bundle.functions || []).map((f: any) => api('GET', '/fn/' + enc(f.name)).then((x) => [f.name, x.source], () => [f.name, '']))).then((p: any) => setLives(Object.fromEntries(p)));
  }, [g]);
  async function decide(what: string) {
    setError(null);
    try { const r = await api('POST', `/generate/${enc(id)}/${what}`); setDone(r.status || what); reload(); onDecided(); } catch (e) { setError(e); }
  }
  if (err) return <ErrorBox error={err} />;
  if (!g) return <p className="muted">Loading…</p>;
  const b = g.bundle || {};
  const waiting = g.status === 'awaiting_approval' || g.status === 'merge_failed';
  return <section className="card" aria-labelledby="gen-h" id="generation">
    <h3 id="gen-h">Generation {g.id} <span className={'badge ' + (g.status === 'merged' ? 'ok' : waiting ? 'wait' : 'bad')} id="gen-status">{g.status}</span></h3>
    <p><strong>Intent:</strong> {g.intent}</p>
    <p className="muted">model {g.model}, {g.rounds_run} round(s), {g.input_tokens} + {g.output_tokens} tokens, branch {g.branch || '—'}</p>
    {g.error ? <div className="error">{g.error}</div> : null}
    <h3>Rounds</h3>
    <ol>{(g.rounds || []).map((r: any) => <li key={r.round}><span className={'badge ' + (r.outcome === 'verified' ? 'ok' : 'bad')}>{r.outcome}</span> {r.elapsed_ms} ms{r.error ? <div className="error">{r.error}</div> : null}
      {(r.checks || []).filter((c: any) => !c.ok).map((c: any, i: number) => <details key={i}><summary>failed check: {c.name}</summary><pre className="out">{JSON.stringify(c, null, 2)}</pre></details>)}</li>)}</ol>
    <h3>Bundle diff against live</h3>
    {(b.migrations || []).map((m: any, i: number) => <div key={'m' + i}><p className="muted">migration {m.name}</p><Diff a="" b={m.sql} label={`Migration ${m.name}`} /></div>)}
    {(b.functions || []).map((f: any) => <div key={f.name}><p className="muted">function {f.name} {lives[f.name] ? '(changed)' : '(new)'}</p><Diff a={lives[f.name] || ''} b={f.source} label={`Function ${f.name}`} /></div>)}
    {b.policies && b.policies.length ? <><p className="muted">policies</p><pre className="out">{JSON.stringify(b.policies, null, 2)}</pre></> : null}
    {b.grants && b.grants.length ? <><p className="muted">grants</p><pre className="out">{JSON.stringify(b.grants, null, 2)}</pre></> : null}
    <ErrorBox error={error} id="gen-error" />
    {waiting ? <div className="row"><button className="primary" id="gen-approve" onClick={() => decide('approve')}>Approve and merge</button><button className="danger" id="gen-discard" onClick={() => decide('discard')}>Discard</button></div> : null}
    {done ? <p role="status" id="gen-done">{done}</p> : null}
  </section>;
}

function Operations() {
  const [backup, e1] = useLoad(() => api('GET', '/admin/backup/status'), []);
  const [branches, e2, reloadBranches] = useLoad(() => api('GET', '/branches').then((r) => r.branches), []);
  const [gens, e3, reloadGens] = useLoad(() => api('GET', '/generate').then((r) => r.generations), []);
  const [sel, setSel] = useState<any>(null);
  const [channel, setChannel] = useState('');
  const [pres, setPres] = useState<any>(null);
  const [perr, setPerr] = useState<any>(null);
  const [conns, , reloadConns] = useLoad(() => api('GET', '/console/api/presence'), []);
  const [error, setError] = useState<any>(null);
  return <div>
    <section className="card" aria-labelledby="gens-h"><h2 id="gens-h">Generations</h2><ErrorBox error={e3} />
      {gens && gens.length === 0 ? <p className="muted">No generations yet (<code>POST /generate</code> or <code>ichibase generate</code>).</p> : null}
      <div className="scroll"><table className="grid" id="generations"><thead><tr><th>intent</th><th>status</th><th>rounds</th><th>created</th><th><span className="sr-only">Open</span></th></tr></thead>
        <tbody>{(gens || []).map((g: any) => <tr key={g.id}><td>{g.intent.slice(0, 80)}</td><td><span className={'badge ' + (g.status === 'merged' ? 'ok' : g.status === 'awaiting_approval' ? 'wait' : '')}>{g.status}</span></td><td>{g.rounds_run}</td><td>{g.created_at}</td>
          <td><button data-gen={g.id} onClick={() => setSel(g.id)}>Open</button></td></tr>)}</tbody></table></div>
      {sel ? <Generation key={sel} id={sel} onDecided={() => { reloadGens(); reloadBranches(); }} /> : null}
    </section>
    <section className="card" aria-labelledby="branches-h"><h2 id="branches-h">Branches</h2><ErrorBox error={e2 || error} />
      {(branches || []).length === 0 ? <p className="muted">No branches.</p> : <ul>{(branches || []).map((b: any) => <li key={b.name}><strong>{b.name}</strong> <span className="muted">{b.created_at} · {b.bytes} bytes</span>
        {(b.pending_bundles || []).map((p: any) => <div key={p.id} className="muted">bundle {p.name}: checks {p.checks_ok === null ? 'not run' : p.checks_ok ? 'passed' : 'failed'}{p.failures ? ' — ' + p.failures.slice(0, 300) : ''}</div>)}
        <button className="danger" onClick={async () => { setError(null); try { await api('DELETE', '/branches/' + enc(b.name)); reloadBranches(); } catch (e) { setError(e); } }}>Delete</button></li>)}</ul>}
    </section>
    <section className="card" aria-labelledby="backup-h"><h2 id="backup-h">Backup</h2><ErrorBox error={e1} />
      {backup ? backup.enabled ? <Kv obj={backup.status} /> : <p className="muted">Replication is not configured (see the README's Backup section).</p> : null}
    </section>
    <section className="card" aria-labelledby="ws-h"><h2 id="ws-h">WebSocket channels</h2>
      <p className="muted">{conns ? conns.connections + ' open connection(s).' : ''} <button id="ws-refresh" onClick={reloadConns}>Refresh</button></p>
      {conns && conns.channels.length ? <div className="scroll"><table className="grid" id="ws-channels"><thead><tr><th>channel</th><th>members</th><th>in presence</th><th><span className="sr-only">Presence</span></th></tr></thead>
        <tbody>{conns.channels.map((c: any) => <tr key={c.channel}><td>{c.channel}</td><td>{c.members}</td><td>{c.tracked}</td>
          <td><button data-channel={c.channel} onClick={async () => { setChannel(c.channel); setPerr(null); try { setPres(await api('GET', '/console/api/presence?channel=' + enc(c.channel))); } catch (x) { setPerr(x); } }}>Who is there</button></td></tr>)}</tbody></table></div> : conns ? <p className="muted">No open channels.</p> : null}
      <form className="row" onSubmit={async (e) => { e.preventDefault(); setPerr(null); try { setPres(await api('GET', '/console/api/presence?channel=' + enc(channel))); } catch (x) { setPerr(x); } }}>
        <label>Channel<input id="ws-channel" value={channel} onChange={(e) => setChannel(e.target.value)} placeholder="public:lobby" required /></label><button type="submit">Who is there</button></form>
      <ErrorBox error={perr} />
      {pres ? <div className="scroll"><table className="grid" id="ws-presence" aria-label={`Presence in ${pres.channel}`}><thead><tr><th>conn</th><th>user</th><th>role</th><th>device</th><th>meta</th><th>since</th></tr></thead>
        <tbody>{(pres.presence || []).map((p: any) => <tr key={p.conn_id}><td>{p.conn_id}</td><td>{p.user_id || ''}</td><td>{p.role}</td><td>{p.device || ''}</td><td className="mono">{JSON.stringify(p.meta)}</td><td>{p.connected_at}</td></tr>)}</tbody></table></div> : null}
    </section>
  </div>;
}

// ---------------------------------------------------------------- the app
const SECTIONS = [['data', 'Data'], ['functions', 'Functions'], ['identity', 'Identity'], ['activity', 'Activity'], ['operations', 'Operations']];

function App() {
  const [me, setMe] = useState<any>(null);
  const [checked, setChecked] = useState(false);
  const [notice, setNotice] = useState<string | null>(null);
  const [section, setSection] = useState(() => (location.hash.slice(1) || 'data'));
  const [users, uerr, reloadUsers] = useLoad(() => me ? api('GET', '/admin/users').then((r) => r.users) : Promise.resolve([]), [me && me.user_id, me && me.role]);
  const pageRows = Number(document.body.dataset.pageRows) || 50;
  useEffect(() => {
    // Already signed in (session cookie, or a credential kept for this tab)?
    api('GET', '/auth/me').then((m) => { if (m.role === 'admin') setMe(m); else if (m.role !== 'anon') setNotice(`Signed in as ${(m.claims && m.claims.email) || m.role}, who is not an admin.`); }, () => {}).finally(() => setChecked(true));
    const h = () => setSection(location.hash.slice(1) || 'data');
    addEventListener('hashchange', h); return () => removeEventListener('hashchange', h);
  }, []);
  useEffect(() => { document.title = 'ichibase console' + (me ? ' · ' + section : ''); }, [section, me]);
  if (!checked) return <p className="boot">Loading the console…</p>;
  if (!me) return <SignIn onIn={setMe} notice={notice} />;
  const go = (s: string) => { location.hash = s; setSection(s); };
  return <>
    <header className="top"><h1>ichibase console</h1><span className="who" id="who">{(me.claims && (me.claims.email || me.claims.key_name)) || 'admin'} · admin</span>
      <button id="signout" onClick={async () => { await request('POST', '/auth/signout').catch(() => {}); setCredential(null); setMe(null); }}>Sign out</button></header>
    <nav className="sections" aria-label="Sections" onKeyDown={(e) => {
      // Arrow keys move between sections.
      const i = SECTIONS.findIndex(([k]) => k === section);
      const d = e.key === 'ArrowRight' ? 1 : e.key === 'ArrowLeft' ? -1 : 0;
      if (d) { e.preventDefault(); const n = SECTIONS[(i + d + SECTIONS.length) % SECTIONS.length][0]; go(n); (document.querySelector(`nav.sections button[data-section=${n}]`) as any)?.focus(); }
    }}>{SECTIONS.map(([k, label]) => <button key={k} data-section={k} aria-current={section === k ? 'page' : undefined} onClick={() => go(k)}>{label}</button>)}</nav>
    <main id="main">
      <ErrorBox error={uerr} />
      {section === 'data' ? <Data users={users} pageRows={pageRows} /> : null}
      {section === 'functions' ? <Functions users={users} /> : null}
      {section === 'identity' ? <Identity me={me} users={users} reloadUsers={reloadUsers} /> : null}
      {section === 'activity' ? <Activity /> : null}
      {section === 'operations' ? <Operations /> : null}
    </main>
  </>;
}

createRoot(document.getElementById('root')!).render(<App />);
