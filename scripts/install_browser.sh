#!/usr/bin/env bash
# Installs Chromium from the system's packages (Debian: apt-get install chromium) unless there is one:
# the browser tests (tests/test_web_browser.py) drive it through Playwright, whose own browser download
# is not used. Needs root or sudo and apt-get; elsewhere install Chromium yourself or name a binary in
# NEGPROMPT_CHROMIUM. Exits 1 (and says why) when it cannot install it.
set -euo pipefail
if [ -n "${NEGPROMPT_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null; then
    SUDO=(sudo)
else
    echo "install_browser: no Chromium, and neither root nor sudo to install it (apt-get install chromium)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser: no Chromium and no apt-get; install Chromium, or name a binary in NEGPROMPT_CHROMIUM" >&2
    exit 1
fi
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
command -v chromium
