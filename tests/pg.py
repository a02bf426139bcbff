"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, ``initdb`` into a
temporary directory, ``postgres`` on a free loopback port, stopped and deleted at the end.

The suite runs the store-bound and job e2e tests against it as well as against SQLite (CI installs
the package through ``scripts/test.sh``). PostgreSQL refuses to run as root, so as root the server
runs as the ``postgres`` system user (the Debian package creates it). A server that cannot start is
a test failure with the server's log, never a skip.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from service.launcher import free_port

START_TIMEOUT_S = 60.0
USER = "cvpo"  # the cluster's superuser (trust authentication, loopback only)


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server could be started; the message says why and how to fix it."""


def bindir() -> Path:
    """Where ``initdb`` and ``postgres`` are: ``$PATH``, else the newest Debian cluster version."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise PostgresUnavailableError(
            "PostgreSQL is not installed: the tests need Debian's `postgresql` package "
            "(./scripts/test.sh installs it as root; else `apt-get install postgresql`)"
        )
    return Path(versions[-1]).parent


class PostgresServer:
    """One cluster for the whole test session; each test gets a database of its own."""

    def __init__(self) -> None:
        # As root the server runs as ``postgres``, which must reach the directory: /tmp, not root's TMPDIR.
        self.root = Path(tempfile.mkdtemp(prefix="cvpo-pg-", dir="/tmp" if os.geteuid() == 0 else None))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count()
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailableError("running as root needs the `postgres` system user") from exc
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)

    def _popen_user(self) -> dict:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def start(self) -> None:
        """initdb, then postgres on a free port (a few tries: another process may take the port first)."""
        bins = bindir()
        init = subprocess.run(
            [str(bins / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
            **self._popen_user(),
        )
        if init.returncode != 0:
            raise PostgresUnavailableError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        deadline = time.monotonic() + START_TIMEOUT_S
        for _ in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        str(bins / "postgres"),
                        *("-D", str(self.data), "-p", str(self.port), "-k", str(self.root)),
                        *("-c", "listen_addresses=127.0.0.1", "-c", "max_connections=400"),
                        # Throwaway data: durability buys nothing here and costs seconds per test.
                        *("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    start_new_session=True,  # a Ctrl-C of pytest does not hit it before the fixture stops it
                    **self._popen_user(),
                )
            if self._wait_ready(deadline):
                return
        raise PostgresUnavailableError(f"postgres did not start within {START_TIMEOUT_S:.0f} s:\n{self.log()}")

    def _wait_ready(self, deadline: float) -> bool:
        import psycopg

        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # e.g. the port was taken after all: the caller tries another
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a test's database, ending the connections its stores and processes left open."""
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[-1]} WITH (FORCE)")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT), a kill if it hangs, then the directory goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
