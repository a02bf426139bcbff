#!/usr/bin/env bash
# The README's service command: installs what is missing, then runs `cvpo serve` with this script's
# arguments (e.g. --host/--port): Redis with a generated password unless REDIS_URL is set, one Celery
# worker, the API on 127.0.0.1:${CVPO_PORT:-8000}; a child that dies is restarted with backoff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cvpo serve "$@"
