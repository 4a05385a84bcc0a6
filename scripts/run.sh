#!/usr/bin/env bash
# Install zhome and start it on http://127.0.0.1:8008 with an embedded SQLite
# database. The first run writes ./homeserver.yaml (server_name from
# ZHOME_SERVER_NAME, default localhost) and keeps data in ./data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
if [ ! -f homeserver.yaml ]; then
  .venv/bin/zhome generate-config --server-name "${ZHOME_SERVER_NAME:-localhost}" \
      --config-path homeserver.yaml --data-dir data ${ZHOME_GENERATE_ARGS:-}
fi
exec .venv/bin/zhome run --config-path homeserver.yaml
