# Headless Chromium for the browser tests (tests/browser, tests/common/browser.rs): Debian's
# `chromium` and `chromium-driver` (apt, installed only when missing) and playwright-core from
# tests/browser/package-lock.json (npm ci; it drives the system browser and never downloads
# one). Exports ICHIBASE_CHROMIUM (the browser) and ICHIBASE_BROWSER_DRIVER (the Node driver).
# Sourced by scripts/test.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
fi
PW_PINNED="$(node -p "require('./tests/browser/package.json').dependencies['playwright-core']")"
PW_HAVE="$(node -p "try { require('./tests/browser/node_modules/playwright-core/package.json').version } catch (e) { '' }")"
if [ "$PW_HAVE" != "$PW_PINNED" ]; then
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi
ICHIBASE_CHROMIUM="$(command -v chromium)"
ICHIBASE_BROWSER_DRIVER="$PWD/tests/browser/driver.mjs"
export ICHIBASE_CHROMIUM ICHIBASE_BROWSER_DRIVER
