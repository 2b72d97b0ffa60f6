#!/usr/bin/env bash
# Set up probe from this checkout: the package with its test extras, and Debian's headless chromium +
# chromedriver for the browser test of `probe serve` (installed only when missing; needs root and apt).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: install chromium and chromium-driver (Debian packages) for the browser test of probe serve" >&2
    fi
fi
