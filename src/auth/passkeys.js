// ichibase passkeys for the browser: sign in with a passkey (no user name), register one, list
// and revoke devices. Served at /auth/passkeys.js; any page of the same origin (the canvas
// shell, the console, an app) can import it:
//
//   import { signInWithPasskey, registerPasskey } from '/auth/passkeys.js';
//   const tokens = await signInWithPasskey();      // session cookie set; tokens.access_token
//
// Calls go to /auth/* with the session cookie (same origin). Errors are thrown as Error objects
// with `status` and `code` (the ichibase error name, e.g. PASSKEY_REJECTED).

const b64u = {
  enc(buf) {
    const b = new Uint8Array(buf);
    let s = '';
    for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
    return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  },
  dec(str) {
    let t = String(str).replace(/-/g, '+').replace(/_/g, '/');
    while (t.length % 4) t += '=';
    const s = atob(t);
    const b = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i);
    return b.buffer;
  },
};

export async function api(path, body, method) {
  const init = { method: method || (body === undefined ? 'GET' : 'POST'), credentials: 'same-origin', headers: { accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const j = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error((j.error && j.error.message) || ('HTTP ' + r.status));
    e.status = r.status;
    e.code = j.error && j.error.name;
    throw e;
  }
  return j;
}

function descriptors(list) {
  return (list || []).map((c) => ({ type: c.type || 'public-key', id: b64u.dec(c.id) }));
}

/** Ask the authenticator for a passkey assertion; `{challenge_id, credential}` to finish with. */
export async function passkeyAssertion() {
  const { challenge_id, options } = await api('/auth/passkeys/signin/start', {});
  const o = options.publicKey;
  const publicKey = {
    challenge: b64u.dec(o.challenge),
    rpId: o.rpId,
    timeout: o.timeout,
    userVerification: o.userVerification,
    allowCredentials: descriptors(o.allowCredentials),
  };
  const cred = await navigator.credentials.get({ publicKey });
  const r = cred.response;
  return {
    challenge_id,
    credential: {
      id: cred.id,
      rawId: b64u.enc(cred.rawId),
      type: cred.type,
      extensions: {},
      response: {
        authenticatorData: b64u.enc(r.authenticatorData),
        clientDataJSON: b64u.enc(r.clientDataJSON),
        signature: b64u.enc(r.signature),
        userHandle: r.userHandle ? b64u.enc(r.userHandle) : null,
      },
    },
  };
}

/** Finish a sign-in with an assertion: the tokens (and the session cookie). */
export function finishPasskeySignin(assertion, device) {
  return api('/auth/passkeys/signin/finish', Object.assign({}, assertion, device ? { device } : {}));
}

/** Sign in with a passkey the authenticator holds for this site (no user name needed). */
export async function signInWithPasskey(device) {
  return finishPasskeySignin(await passkeyAssertion(), device);
}

/** Register a passkey for the signed-in user; its `{id, name, ...}`. */
export async function registerPasskey(name) {
  const { challenge_id, options } = await api('/auth/passkeys/register/start', name ? { name } : {});
  const o = options.publicKey;
  const publicKey = Object.assign({}, o, {
    challenge: b64u.dec(o.challenge),
    user: Object.assign({}, o.user, { id: b64u.dec(o.user.id) }),
    excludeCredentials: descriptors(o.excludeCredentials),
  });
  const cred = await navigator.credentials.create({ publicKey });
  return api('/auth/passkeys/register/finish', {
    challenge_id,
    credential: {
      id: cred.id,
      rawId: b64u.enc(cred.rawId),
      type: cred.type,
      extensions: {},
      response: {
        attestationObject: b64u.enc(cred.response.attestationObject),
        clientDataJSON: b64u.enc(cred.response.clientDataJSON),
      },
    },
  });
}

// ----- the sign-in page (/auth/passkey) -----

const $ = (s) => document.querySelector(s);

function status(text, bad) {
  const el = $('#status');
  el.textContent = text;
  el.dataset.state = bad ? 'error' : 'ok';
}

function item(text, buttons) {
  const li = document.createElement('li');
  const span = document.createElement('span');
  span.textContent = text;
  li.append(span);
  for (const [label, attrs, fn] of buttons) {
    const b = document.createElement('button');
    b.textContent = label;
    for (const [k, v] of Object.entries(attrs)) b.setAttribute(k, v);
    b.addEventListener('click', () => fn().catch((e) => status(e.message, true)));
    li.append(' ', b);
  }
  return li;
}

async function refresh() {
  const me = await api('/auth/me').catch(() => ({}));
  const inside = !!me.user_id;
  $('#signed-out').hidden = inside;
  $('#signed-in').hidden = !inside;
  document.body.dataset.signedIn = inside ? 'yes' : 'no';
  if (!inside) return;
  $('#who').textContent = (me.claims && me.claims.email) || me.user_id;
  const { passkeys } = await api('/auth/passkeys');
  const pl = $('#passkeys');
  pl.replaceChildren(...passkeys.map((p) => item(p.name + (p.last_used_at ? ' (last used ' + p.last_used_at + ')' : ''), [
    ['Rename', { 'data-rename-passkey': p.id }, async () => {
      const name = prompt('New name', p.name);
      if (name) { await api('/auth/passkeys/' + encodeURIComponent(p.id), { name }, 'PATCH'); await refresh(); }
    }],
    ['Delete', { 'data-delete-passkey': p.id }, async () => { await api('/auth/passkeys/' + encodeURIComponent(p.id), undefined, 'DELETE'); await refresh(); }],
  ])));
  const { devices } = await api('/auth/devices');
  const dl = $('#devices');
  dl.replaceChildren(...devices.map((d) => item((d.name || 'device') + (d.current ? ' (this device)' : '') + ' · last seen ' + d.last_seen_at + (d.last_ip ? ' from ' + d.last_ip : ''), d.current ? [] : [
    ['Sign out this device', { 'data-revoke-device': d.id }, async () => {
      await api('/auth/devices/' + encodeURIComponent(d.id), undefined, 'DELETE');
      status('Signed out ' + (d.name || 'the device'));
      await refresh();
    }],
  ])));
  dl.dataset.count = String(devices.length);
  pl.dataset.count = String(passkeys.length);
}

function on(sel, fn) {
  $(sel).addEventListener('click', (ev) => {
    ev.preventDefault();
    fn().catch((e) => status(e.message, true));
  });
}

function initPage() {
  if (!window.PublicKeyCredential) status('This browser (or this address: passkeys need HTTPS or localhost) cannot use passkeys', true);
  on('#signin-passkey', async () => {
    const t = await signInWithPasskey();
    status('Signed in with a passkey as ' + t.user.email);
    await refresh();
  });
  on('#signin-password', async () => {
    const t = await api('/auth/signin', { email: $('#email').value, password: $('#password').value });
    status('Signed in as ' + t.user.email);
    await refresh();
  });
  on('#add-passkey', async () => {
    const p = await registerPasskey($('#passkey-name').value || undefined);
    status('Passkey added: ' + p.name);
    await refresh();
  });
  on('#signout', async () => {
    await api('/auth/signout', {});
    status('Signed out');
    await refresh();
  });
  on('#signout-everywhere', async () => {
    const r = await api('/auth/devices/revoke-all', {});
    status('Signed out everywhere (' + r.sessions_revoked + ' sessions)');
    await refresh();
  });
  refresh().then(() => { document.body.dataset.ready = 'yes'; });
}

if (typeof document !== 'undefined' && document.querySelector('[data-ichibase-passkey-page]')) initPage();
