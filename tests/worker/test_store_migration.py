"""A store created before a column was renamed opens with the new name and keeps its values."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from core.store import Store
from core.store.schema import RENAMED_COLUMNS, checkpoints, metadata


def test_an_old_store_gets_eval_reward_renamed_to_eval_return(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    renamed = {new: old_name for (table, old_name), new in RENAMED_COLUMNS.items() if table == "checkpoints"}
    cols = [
        sa.Column(renamed.get(c.name, c.name), c.type, primary_key=c.primary_key, nullable=c.nullable)
        for c in checkpoints.columns
    ]
    table = sa.Table("checkpoints", old, *cols)
    engine = sa.create_engine(url)
    old.create_all(engine)
    row = {c.name: None for c in table.columns} | {
        "id": "ckpt_old",
        "job_id": "job_old",
        "attempt": 1,
        "epoch": 3,
        "env_step": 4000,
        "path": "x",
        "eval_reward": 12.5,
        "eval_cost": 7.0,
        "created_at": 1.0,
    }
    row.pop("seq")
    with engine.begin() as c:
        c.execute(table.insert().values(**row))
    engine.dispose()

    store = Store(url, tmp_path)
    assert "checkpoints.eval_reward -> eval_return" in store.migrated
    names = {c["name"] for c in sa.inspect(store.engine).get_columns("checkpoints")}
    assert "eval_return" in names and "eval_reward" not in names
    with store.engine.connect() as c:
        assert c.execute(sa.select(checkpoints.c.eval_return).where(checkpoints.c.id == "ckpt_old")).scalar() == 12.5
    store.engine.dispose()
    assert Store(url, tmp_path).migrated == []  # the second open has nothing to do
    assert set(metadata.tables) >= {"checkpoints"}
