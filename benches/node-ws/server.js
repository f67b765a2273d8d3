// The baseline of `cargo bench --bench ws`: a minimal broadcast server on npm `ws`, speaking
// the part of ichibase's WebSocket protocol the fan-out bench uses, so the same clients run the
// same schedule against both servers in one run.
//
// - `GET /ws` upgrades (any credentials are ignored); the server sends a `hello` frame;
//   `{"type":"join","channel":...}` adds the socket to the channel and answers
//   `{"type":"joined","channel":...,"presence":[]}`.
// - `POST /broadcast {"channel","payload"}` serialises
//   `{"type":"broadcast","channel","payload","from"}` once into a Buffer, sends it to every
//   member and answers `{"delivered": n}`.
//
// It prints `node-ws listening on http://127.0.0.1:PORT` once listening (port 0: any free port).
// Install with `npm ci` in this directory (package-lock.json pins ws 8.23.0).
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

const channels = new Map(); // name -> Set<WebSocket>

const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/broadcast') {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e) {
      res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ error: String(e) }));
      return;
    }
    const members = channels.get(body.channel);
    const frame = Buffer.from(JSON.stringify({
      type: 'broadcast',
      channel: body.channel,
      payload: body.payload === undefined ? null : body.payload,
      from: { user_id: null, role: 'admin' },
    }));
    let delivered = 0;
    if (members) {
      for (const ws of members) {
        if (ws.readyState === ws.OPEN) {
          ws.send(frame, { binary: false });
          delivered += 1;
        }
      }
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ delivered }));
  });
});

const wss = new WebSocketServer({ server, path: '/ws', maxPayload: 1 << 20 });
let nextId = 1;
wss.on('connection', (ws) => {
  const id = nextId++;
  const joined = new Set();
  ws.send(JSON.stringify({ type: 'hello', protocol: 1, conn_id: id, user_id: null, role: 'admin' }));
  ws.on('message', (data, isBinary) => {
    let m;
    try {
      m = JSON.parse(data.toString('utf8'));
    } catch (e) {
      ws.send(JSON.stringify({ type: 'error', message: 'invalid JSON' }));
      return;
    }
    if (m.type === 'join' && typeof m.channel === 'string') {
      let set = channels.get(m.channel);
      if (!set) {
        set = new Set();
        channels.set(m.channel, set);
      }
      set.add(ws);
      joined.add(m.channel);
      ws.send(JSON.stringify({ type: 'joined', channel: m.channel, presence: [], ref: m.ref === undefined ? null : m.ref }));
    } else if (m.type === 'ping') {
      ws.send(JSON.stringify({ type: 'pong', ref: m.ref === undefined ? null : m.ref }));
    } else {
      ws.send(JSON.stringify({ type: 'error', message: 'unsupported' }));
    }
  });
  ws.on('close', () => {
    for (const ch of joined) {
      const set = channels.get(ch);
      if (set) {
        set.delete(ws);
        if (set.size === 0) channels.delete(ch);
      }
    }
  });
  ws.on('error', () => {});
});

server.listen({ host: '127.0.0.1', port: Number(process.env.PORT || 0), backlog: 4096 }, () => {
  console.log(`node-ws listening on http://127.0.0.1:${server.address().port}`);
});
process.on('SIGTERM', () => process.exit(0));
