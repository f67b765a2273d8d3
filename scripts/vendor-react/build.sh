#!/usr/bin/env bash
# Re-vendor React for the canvas (src/canvas/assets/vendor): installs the pinned packages of
# package.json / package-lock.json with `npm ci` and runs build.mjs. Commit the result.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
node build.mjs
