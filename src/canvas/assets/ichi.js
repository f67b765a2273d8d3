// `ichi`: the API deployed UIs get, inside their sandboxed frame. Every call is a postMessage
// to the shell, which does the request as the signed-in user; the frame never sees a
// credential and may not connect anywhere itself (its CSP has connect-src 'none').
//   ichi.call(fn, args)            → the Lua function's answer
//   ichi.sql(query, params)        → rows (objects), through row-level security
//   ichi.subscribe(name, cb, opts) → unsubscribe(); a table/view (change events) or, for names
//                                    with ':' or opts.channel, a channel (broadcast payloads)
//   ichi.rate(generation, score, note) → POST /ai/generations/{id}/feedback
let seq = 0;
const pending = new Map();
const subs = new Map();

function rpc(op, args) {
  return new Promise((resolve, reject) => {
    const id = ++seq;
    pending.set(id, { resolve, reject });
    window.parent.postMessage({ ichi: 1, op, id, args }, '*');
  });
}

window.addEventListener('message', (e) => {
  if (e.source !== window.parent) return;
  const m = e.data;
  if (!m || m.ichi !== 1) return;
  if (m.op === 'reply') {
    const p = pending.get(m.id);
    if (!p) return;
    pending.delete(m.id);
    if (m.error) {
      const err = new Error(m.error.message || 'request failed');
      Object.assign(err, m.error);
      p.reject(err);
    } else p.resolve(m.value);
  } else if (m.op === 'event') {
    const cb = subs.get(m.sub);
    if (cb) try { cb(m.event); } catch (err) { console.error(err); }
  }
});

export const ichi = {
  call: (fn, args) => rpc('call', { fn: String(fn), args: args === undefined ? null : args }),
  sql: (query, params) => rpc('sql', { query: String(query), params: params || {} }),
  subscribe(name, cb, opts) {
    const sub = 's' + (++seq);
    subs.set(sub, cb);
    rpc('subscribe', { sub, name: String(name), opts: opts || {} }).catch((err) => console.error('ichi.subscribe', err));
    return () => { subs.delete(sub); rpc('unsubscribe', { sub }).catch(() => {}); };
  },
  rate: (generation, score, note) => rpc('rate', { generation: String(generation), score, note: note === undefined ? null : note }),
};
globalThis.ichi = ichi;
export default ichi;
