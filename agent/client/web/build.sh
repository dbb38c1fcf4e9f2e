#!/usr/bin/env bash
# Vendor the web UI's browser libraries (pinned by package-lock.json) into static/vendor/ (idempotent).
# `make install` calls it. The page loads nothing from a CDN: the machines it runs on may be offline.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v npm >/dev/null; then
    echo "build.sh: npm not found (apt-get install -y nodejs npm)" >&2
    exit 1
fi
# Skip npm when node_modules was installed from this exact lockfile (offline re-runs stay fast).
LOCK_SUM=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat node_modules/.lock-sha256 2>/dev/null)" != "$LOCK_SUM" ]; then
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    echo "$LOCK_SUM" > node_modules/.lock-sha256
fi

VENDOR=static/vendor
rm -rf "$VENDOR.tmp"
mkdir -p "$VENDOR.tmp"
HLJS=node_modules/@highlightjs/cdn-assets
cp node_modules/marked/lib/marked.umd.js "$VENDOR.tmp/marked.umd.js"
cp node_modules/marked/LICENSE "$VENDOR.tmp/marked.LICENSE"
cp node_modules/dompurify/dist/purify.min.js "$VENDOR.tmp/purify.min.js"
cp node_modules/dompurify/LICENSE "$VENDOR.tmp/dompurify.LICENSE"
cp "$HLJS/highlight.min.js" "$VENDOR.tmp/highlight.min.js"
cp "$HLJS/styles/github.min.css" "$VENDOR.tmp/hljs-light.min.css"
cp "$HLJS/styles/github-dark.min.css" "$VENDOR.tmp/hljs-dark.min.css"
cp "$HLJS/LICENSE" "$VENDOR.tmp/highlight.js.LICENSE"
# Swap in one step so a server running meanwhile never sees a half-copied folder.
rm -rf "$VENDOR"
mv "$VENDOR.tmp" "$VENDOR"
echo "web UI libraries vendored into agent/client/web/$VENDOR"
