#!/usr/bin/env bash
# Idempotent installer used by both README commands: Debian redis-server, a .venv in the repo root,
# the pinned Python dependencies and safety-gymnasium without its broken pins; with --with-postgresql
# (the test command) also Debian's postgresql, for the store tests' throwaway server.
# Re-running is cheap: the pip step is skipped while pyproject.toml and requirements-nodeps.txt
# are unchanged (a hash is stored in .venv/.cvpo-installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" - <<'PY' || { echo "setup: Python 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
PY

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing redis-server (Debian package)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        # The package may start a system-wide instance; we run our own on a private port and dir.
        (service redis-server stop || true) >/dev/null 2>&1
    else
        echo "setup: redis-server is missing; install it (e.g. 'sudo apt-get install redis-server')" >&2
        exit 1
    fi
fi

# The dashboard's browser tests drive Debian's chromium headless (no browser download).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing chromium and chromium-driver (Debian packages, for the dashboard tests)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-dejavu-core >/dev/null
    else
        echo "setup: chromium/chromium-driver missing; the dashboard tests need them (apt-get install chromium chromium-driver)" >&2
    fi
fi

# The test command (scripts/test.sh passes --with-postgresql) runs the store-bound tests against a
# throwaway PostgreSQL as well as SQLite; tests/pg.py starts it from Debian's binaries itself.
if [ "${1:-}" = "--with-postgresql" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing postgresql (Debian package, for the store tests)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        # The package may start a system-wide cluster; the tests run their own on a free port.
        (service postgresql stop || true) >/dev/null 2>&1
    else
        echo "setup: postgresql is missing; the store tests need it (apt-get install postgresql)" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi

stamp=$(cat pyproject.toml requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.cvpo-installed 2>/dev/null || true)" != "$stamp" ]; then
    echo "setup: installing pinned dependencies into .venv (about a minute the first time)"
    # (pip's "Location … is ignored" lines come from this machine's optional local indexes.)
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    # safety-gymnasium 1.0.0 pins pygame==2.1.0 (no cp311 wheel) and gymnasium-robotics; neither is
    # needed for the single-agent tasks, so it goes in without its dependency pins.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    echo "$stamp" > .venv/.cvpo-installed
fi
