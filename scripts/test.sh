#!/usr/bin/env bash
# Installs sdbatch with its test extras into .venv and runs the whole test suite.
# The page and report tests drive Debian's headless Chromium; it is installed here when missing
# (as root, as on CI).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -m pytest -q "$@"
