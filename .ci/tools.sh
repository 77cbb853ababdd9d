#!/usr/bin/env bash
# System tools some checks use (promtool from Debian's prometheus package; chromium for the
# console's browser tests, driven by Playwright with executable_path). Installed only when
# missing; tests that need a tool skip with a reason when it cannot be had, except in CI where
# a missing tool is an error (CI=true makes the suite strict).
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "tools.sh: missing ${need[*]} and cannot install (not root or no apt-get)" >&2
    [ "${CI:-}" = true ] && exit 1
  fi
fi
