#!/usr/bin/env bash
# Install zhome with what the tests need, then run the whole test suite
# (every storage and end-to-end test on SQLite and on PostgreSQL at
# 127.0.0.1:5432). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/pip install -q -r requirements-test.txt
# The pinned Synapse (requirements-synapse.txt) the interop tests federate
# with, in its own venv (.synapse-venv); a no-op when already installed. If
# it cannot be installed the rest of the suite still runs and the Synapse
# tests fail (they never skip).
.venv/bin/python -m tests.e2e.synapse_peer install ||
  echo "warning: could not install Synapse; tests/e2e/test_synapse_federation.py will fail" >&2
# The browser test (tests/e2e/test_cinny.py) drives a web client in Debian's
# chromium with playwright-core from npm (pinned in tests/browser). If either
# cannot be installed the rest of the suite still runs and that test fails
# (it never skips).
if [ ! -x /usr/bin/chromium ]; then
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "warning: could not install chromium; tests/e2e/test_cinny.py will fail" >&2
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null) ||
  echo "warning: npm ci failed in tests/browser; tests/e2e/test_cinny.py will fail" >&2
# matrix-js-sdk with its Rust crypto, for the end-to-end encryption scenarios
# in tests/jssdk (pinned by its package-lock.json). If npm cannot install it
# the rest of the suite still runs and tests/e2e/test_jssdk_e2ee.py fails.
(cd tests/jssdk && npm ci --no-audit --no-fund --loglevel=error) ||
  echo "warning: npm ci in tests/jssdk failed; tests/e2e/test_jssdk_e2ee.py will fail" >&2
# Two workers, each taking whole test files (module-scoped servers stay
# in one worker); ZHOME_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -q -n "${ZHOME_TEST_WORKERS:-2}" --dist loadfile "$@"
