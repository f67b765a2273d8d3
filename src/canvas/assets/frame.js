// The frame runtime: mounts one deployed UI (sent by the shell) under an error boundary,
// reports paints, runtime errors and (in debug mode) clicked elements to the shell. A redeploy
// of the same UI goes through React Fast Refresh: components whose hooks did not change keep
// their state.
import RR from '/vendor/react-refresh.js';
import React from 'react';
import { createRoot } from 'react-dom/client';
import 'ichi';

globalThis.$RefreshReg$ = () => {};
globalThis.$RefreshSig$ = () => (type) => type;
let mounts = 0;
let resets = 0; // bumps the boundary's key after an error, so a redeploy mounts afresh

const h = React.createElement;
const root = createRoot(document.getElementById('root'));
let current = null; // { name, target, version, hash }
let debug = false;
let cssLink = null;
let onPainted = null;

const post = (msg) => window.parent.postMessage(Object.assign({ ichi: 1 }, msg), '*');

function nearestSource(el) {
  const n = el && el.closest ? el.closest('[data-ichi-src]') : null;
  return n ? n.getAttribute('data-ichi-src') : null;
}

class Boundary extends React.Component {
  constructor(props) { super(props); this.state = { error: null, position: null }; }
  static getDerivedStateFromError(error) { return { error }; }
  componentDidCatch(error, info) {
    post({ op: 'error', ui: current, message: String(error && error.message || error), stack: String(error && error.stack || ''),
      component_stack: String(info && info.componentStack || '') });
  }
  render() {
    if (this.state.error) {
      const pos = this.state.position;
      return h('div', { id: 'ichi-error', role: 'alert', style: { border: '2px solid #dc2626', background: '#fef2f2', color: '#7f1d1d', padding: '12px', margin: '8px', fontFamily: 'monospace', whiteSpace: 'pre-wrap' } },
        h('strong', null, 'This UI failed: '), String(this.state.error.message || this.state.error),
        pos ? h('div', { id: 'ichi-error-position' }, `at ${current ? current.name : 'ui'}.tsx:${pos}`) : null);
    }
    return this.props.children;
  }
}

let boundary = null;

function Painted({ children, token }) {
  React.useLayoutEffect(() => {
    requestAnimationFrame(() => setTimeout(() => { if (onPainted) onPainted(token); }, 0));
  });
  return children;
}

async function mount(ui) {
  let mod;
  const family = ui.name + ':';
  globalThis.$RefreshReg$ = (type, id) => RR.register(type, family + id);
  globalThis.$RefreshSig$ = RR.createSignatureFunctionForTransform;
  try {
    // A fresh URL per mount: the module runs (and registers its components) again, also when
    // a rollback brings back code this frame imported before.
    mod = await import('/code/' + ui.hash + '.js?m=' + (++mounts));
  } catch (err) {
    current = ui;
    post({ op: 'error', ui, message: String(err && err.message || err), stack: String(err && err.stack || ''), component_stack: '' });
    root.render(h('div', { id: 'ichi-error', role: 'alert', style: { border: '2px solid #dc2626', padding: '12px' } }, 'This UI failed to load: ' + String(err && err.message || err)));
    return;
  }
  const link = document.createElement('link');
  link.rel = 'stylesheet';
  link.href = '/code/' + ui.hash + '.css';
  await new Promise((res) => { link.onload = res; link.onerror = res; document.head.appendChild(link); });
  if (cssLink) cssLink.remove();
  cssLink = link;
  current = { name: ui.name, target: ui.target, version: ui.version, hash: ui.hash };
  const Comp = mod.default || mod.App || (() => h('div', null, 'This UI exports no component (export default function App() {...})'));
  const token = ui.hash + ':' + ui.version;
  onPainted = (t) => { if (t === token) { onPainted = null; post({ op: 'painted', ui: current }); } };
  if (boundary && boundary.state.error) resets++;
  root.render(h(Painted, { token }, h(Boundary, { key: ui.name + ':' + resets, ref: (b) => { boundary = b; } }, h(Comp, ui.props || {}))));
  RR.performReactRefresh();
}

window.addEventListener('message', (e) => {
  if (e.source !== window.parent) return;
  const m = e.data;
  if (!m || m.ichi !== 1) return;
  if (m.op === 'mount') { debug = !!m.debug; mount(m.ui); }
  else if (m.op === 'error-position' && boundary && boundary.state.error) boundary.setState({ position: m.position });
});

document.addEventListener('click', (e) => {
  const src = nearestSource(e.target);
  post({ op: 'event', type: 'click', src, ui: current });
  if (!debug) return;
  const el = e.target.closest ? (e.target.closest('[data-ichi-src]') || e.target) : e.target;
  post({ op: 'inspect', ui: current, src, tag: el.tagName ? el.tagName.toLowerCase() : '', text: String(el.textContent || '').slice(0, 500) });
}, true);

// Errors outside rendering (event handlers, promises) do not reach the boundary: report them.
const reportUncaught = (err) => {
  if (!current) return;
  post({ op: 'error', ui: current, message: String(err && err.message || err), stack: String(err && err.stack || ''), component_stack: '' });
};
window.addEventListener('error', (e) => reportUncaught(e.error || e.message));
window.addEventListener('unhandledrejection', (e) => reportUncaught(e.reason));

post({ op: 'ready' });
