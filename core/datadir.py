"""The data directory and the SQLite store file, created private (issue #23 item 8).

The data dir holds the API token, the Redis password, the job store (token hashes, every job's
spec) and the policies; with the default umask it was 0755 and the database 0644, readable by every
local user. Every process that may create them (``cvpo serve``/``api``/``worker`` and the API's
lifespan) calls :func:`prepare_data_dir` first, so whichever comes first creates them 0700 / 0600;
an existing dir or file this user owns is tightened to the same modes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from core.settings import Settings

DIR_MODE = 0o700
FILE_MODE = 0o600


def _tighten(path: Path, mode: int) -> None:
    """chmod a path this user owns (one mounted from elsewhere and owned by another is left alone)."""
    with contextlib.suppress(OSError):
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 for the last part, or tighten it."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DIR_MODE)
    return path


def sqlite_path(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing (SQLite gives its -wal/-shm/-journal
    files the database file's mode), or tighten it."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    _tighten(path, FILE_MODE)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            _tighten(side, FILE_MODE)


def prepare_data_dir(settings: Settings) -> Path:
    """Data dir 0700 and the SQLite store file 0600 (an empty file is a valid empty database)."""
    private_dir(settings.data_dir)
    db = sqlite_path(settings.resolved_database_url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        private_file(db)
    return settings.data_dir
