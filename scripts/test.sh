#!/usr/bin/env bash
# Install the test needs into .venv, make sure Redis answers, type-check the package, check its layers, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests that restart Redis start their own redis-server on a free port: the binary must be there.
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
# DSPEX_TEST_REDIS_URL points the suite at another Redis; otherwise make sure the local one answers.
if [ -z "${DSPEX_TEST_REDIS_URL:-}" ] && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -m mypy  # the package's types (settings in pyproject.toml)
.venv/bin/lint-imports  # the layer contract ([tool.importlinter] in pyproject.toml)
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
