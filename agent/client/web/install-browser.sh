#!/usr/bin/env bash
# Install Debian's Chromium for the web UI's Playwright tests (idempotent; `make test` calls it).
# Never `playwright install`: it downloads browsers from the internet and fails offline (docs/environment.md).
# fonts-dejavu-core is named so that screenshots look the same on every machine.
set -euo pipefail

PACKAGES=(chromium fonts-dejavu-core)
if dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1 && [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
echo "installing ${PACKAGES[*]} for the browser tests (~30 s)..."
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
/usr/bin/chromium --version
