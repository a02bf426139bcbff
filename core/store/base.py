"""What every part of the store shares: the engine (schema created and migrated on open), ``tx()`` for
writes, ``_read()`` for lock-free reads, and cursor paging. The facade ``core.store.Store`` composes the
mixins built on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.store.records import _encode_cursor, decode_cursor
from core.store.schema import READ_ONLY, _migrate, _schema_lock, make_engine, metadata


class StoreBase:
    """The engine and its connections; the aggregates' mixins add the reads and writes."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = Path(data_dir)
        self.engine = make_engine(url)
        with _schema_lock(self.engine):
            metadata.create_all(self.engine)
            self.migrated = _migrate(self.engine)
        self._reader = self.engine.execution_options(**{READ_ONLY: True})  # same pool, deferred BEGIN

    def _read(self) -> Connection:
        """A connection for reads only (its transaction is never committed): deferred, lock-free on SQLite."""
        return self._reader.connect()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def ping(self) -> bool:
        try:
            with self._read() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    def _page(
        self,
        table: sa.Table,
        convert: Any,
        filters: dict[str, Any],
        page_size: int,
        page_token: str | None,
        query: sa.Select | None = None,
    ) -> tuple[list[Any], str | None]:
        """Newest first by ``table.seq``; equality filters skip None; the token is the last seq returned.
        ``query`` replaces ``select(table)`` where rows need more than the table (e.g. a join)."""
        q = sa.select(table) if query is None else query
        for column, value in filters.items():
            if value is not None:
                q = q.where(table.c[column] == value)
        cursor = decode_cursor(page_token)
        if cursor is not None:
            q = q.where(table.c.seq < cursor)
        with self._read() as c:
            rows = c.execute(q.order_by(table.c.seq.desc()).limit(page_size + 1)).all()
        items = [convert(r) for r in rows[:page_size]]
        return items, (_encode_cursor(items[-1].seq) if len(rows) > page_size and items else None)
