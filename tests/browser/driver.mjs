// The project's Chromium harness: drives Debian's headless Chromium (ICHIBASE_CHROMIUM, default
// /usr/bin/chromium) with playwright-core, which never downloads a browser. Tests talk to it
// over stdin/stdout, one JSON object per line: {"id", "cmd", ...} → {"id", "ok", "value"} or
// {"id", "ok": false, "error"}. See tests/common/browser.rs for the Rust side.
//
// The browser's network is limited to loopback: 127.0.0.1, and `localhost` / `*.localhost`
// (mapped to 127.0.0.1: WebAuthn needs a domain as relying-party id); every other host goes to
// a dead proxy and no other name resolves. Each page records every request it (and its frames)
// made. `cdp` sends a Chrome DevTools Protocol command to a page (e.g. `WebAuthn.enable` and
// `WebAuthn.addVirtualAuthenticator` for passkey tests).
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const executablePath = process.env.ICHIBASE_CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-dev-shm-usage',
    '--proxy-server=http://127.0.0.1:9', '--proxy-bypass-list=<-loopback>;127.0.0.1;localhost;*.localhost',
    '--host-resolver-rules=MAP localhost 127.0.0.1, MAP *.localhost 127.0.0.1, MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
  ],
});
const pages = new Map();
let next = 0;

function frameFor(p, sel) {
  if (!sel) return Promise.resolve(p.page.mainFrame());
  return p.page.$(sel).then(async (h) => {
    if (!h) throw new Error(`no element ${sel}`);
    const f = await h.contentFrame();
    if (!f) throw new Error(`${sel} is not a frame (yet)`);
    return f;
  });
}

async function run(m) {
  const p = m.page != null ? pages.get(m.page) : null;
  if (m.page != null && !p) throw new Error('no page ' + m.page);
  switch (m.cmd) {
    case 'version': return browser.version();
    case 'newPage': {
      const context = await browser.newContext();
      const page = await context.newPage();
      const id = ++next;
      const rec = { page, context, requests: [], console: [] };
      const entries = new WeakMap();
      page.on('request', (r) => {
        let frame = null;
        try { frame = r.frame() ? r.frame().url() : null; } catch (_) { frame = null; }
        const e = { url: r.url(), method: r.method(), frame, headers: r.headers(), failure: null, status: null };
        entries.set(r, e);
        rec.requests.push(e);
      });
      page.on('requestfailed', (r) => { const e = entries.get(r); if (e) e.failure = r.failure() ? r.failure().errorText : 'failed'; });
      page.on('response', (r) => { const e = entries.get(r.request()); if (e) e.status = r.status(); });
      page.on('console', (c) => rec.console.push(c.type() + ': ' + c.text()));
      page.on('pageerror', (e) => rec.console.push('pageerror: ' + e.message));
      pages.set(id, rec);
      return id;
    }
    case 'goto': await p.page.goto(m.url, { waitUntil: 'load', timeout: m.timeout || 60000 }); return null;
    case 'eval': {
      const f = await frameFor(p, m.frame);
      return await f.evaluate(m.js);
    }
    case 'waitFor': {
      const deadline = Date.now() + (m.timeout || 60000);
      let last = null;
      for (;;) {
        try {
          const f = await frameFor(p, m.frame);
          const v = await f.evaluate(m.js);
          if (v) return v;
        } catch (e) { last = e.message; }
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${m.js}` + (last ? ` (last error: ${last})` : ''));
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    case 'click': { const f = await frameFor(p, m.frame); await f.click(m.selector, { timeout: m.timeout || 30000 }); return null; }
    case 'hover': { const f = await frameFor(p, m.frame); await f.hover(m.selector, { timeout: m.timeout || 30000 }); return null; }
    case 'press': { const f = await frameFor(p, m.frame); await f.press(m.selector, m.key, { timeout: m.timeout || 30000 }); return null; }
    case 'select': { const f = await frameFor(p, m.frame); await f.selectOption(m.selector, m.value, { timeout: m.timeout || 30000 }); return null; }
    case 'viewport': await p.page.setViewportSize({ width: m.width, height: m.height }); return null;
    case 'fill': { const f = await frameFor(p, m.frame); await f.fill(m.selector, m.value, { timeout: m.timeout || 30000 }); return null; }
    case 'cdp': {
      if (!p.cdp) p.cdp = await p.context.newCDPSession(p.page);
      return await p.cdp.send(m.method, m.params || {});
    }
    case 'requests': return p.requests;
    case 'console': return p.console;
    case 'closePage': await p.context.close(); pages.delete(m.page); return null;
    case 'quit': await browser.close(); setTimeout(() => process.exit(0), 10); return null;
    default: throw new Error('unknown command ' + m.cmd);
  }
}

const rl = createInterface({ input: process.stdin });
process.stdout.write(JSON.stringify({ id: 0, ok: true, value: 'ready' }) + '\n');
rl.on('line', async (line) => {
  let m;
  try { m = JSON.parse(line); } catch (e) { return; }
  try {
    const value = await run(m);
    process.stdout.write(JSON.stringify({ id: m.id, ok: true, value: value === undefined ? null : value }) + '\n');
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: m.id, ok: false, error: String(e && e.message || e) }) + '\n');
  }
});
rl.on('close', async () => { await browser.close().catch(() => {}); process.exit(0); });
