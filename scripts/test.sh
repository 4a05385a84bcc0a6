#!/usr/bin/env bash
# Install zhome with what the tests need, then run the whole test suite
# (every storage and end-to-end test on SQLite and on PostgreSQL at
# 127.0.0.1:5432). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/pip install -q -r requirements-test.txt
exec .venv/bin/python -m pytest -q "$@"
