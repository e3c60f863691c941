#!/usr/bin/env bash
# Install the test needs into .venv, make sure Redis, RabbitMQ and PostgreSQL answer, type-check the package, check its layers, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh  # Redis, RabbitMQ and PostgreSQL, started when they do not answer
# Headless Chromium for the screenshot test (tests/test_flower.py): Debian's package, when missing
if ! command -v chromium >/dev/null; then
  as_root=$([ "$(id -u)" = 0 ] || echo sudo)
  $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -m mypy  # the package's types (settings in pyproject.toml)
.venv/bin/lint-imports  # the layer contract ([tool.importlinter] in pyproject.toml)
# Three test files at a time (pytest-xdist; a file's tests stay together, so its cluster fixtures are shared):
# the integration tests mostly wait on workers, so this halves the wall time on 2 cores (19 -> 9 min).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile "$@"
