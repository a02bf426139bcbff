#!/usr/bin/env bash
# The README's test command: installs what is missing (PostgreSQL too: the store-bound tests run on a
# throwaway server as well as on SQLite, tests/pg.py), lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-postgresql
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
