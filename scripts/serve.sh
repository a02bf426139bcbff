#!/usr/bin/env bash
# The README's service command: installs what is missing, then starts the service.
# Until the API and worker land (issues "Training service" and "Policy serving") this runs the
# environment check: the task catalogue, built and stepped on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cvpo envs --check "$@"
