#!/usr/bin/env bash
# The README's service command: installs what is missing, then runs `cvpo serve`
# (Redis unless REDIS_URL is set, one Celery worker, the API on 127.0.0.1:${CVPO_PORT:-8000}).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cvpo serve "$@"
