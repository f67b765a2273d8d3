// The canvas's react/jsx-dev-runtime: React's production JSX runtime, plus the TSX position of
// every host element (the compiler passes it) as `data-ichi-src="line:column"`, which the
// spatial debugger and the error overlay read.
import { jsx, jsxs, Fragment } from 'react/jsx-runtime';
export { Fragment };
export function jsxDEV(type, props, key, isStatic, source) {
  if (typeof type === 'string' && source && props && props['data-ichi-src'] === undefined) {
    props = Object.assign({}, props, { 'data-ichi-src': source.lineNumber + ':' + source.columnNumber });
  }
  return isStatic ? jsxs(type, props, key) : jsx(type, props, key);
}
