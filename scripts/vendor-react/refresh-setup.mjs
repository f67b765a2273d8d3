// Evaluated before React and ReactDOM in react-all.js: Fast Refresh must hook into React first.
import RR from 'react-refresh/runtime';
RR.injectIntoGlobalHook(globalThis);
export default RR;
