"""Checkpoint retention with a real store (SQLite and PostgreSQL) and real directories, no training
(issue #23 item 11).

The end-to-end runs (a real worker training, a kill -9 and a resume with retention on) are in
tests/e2e/test_retention.py; here each rule is checked on hand-made checkpoints: the newest N, the
best by the store's ranking and promoted ones keep their files, the others are marked in the store
before they go, nothing resumes from a marked or incomplete checkpoint, and what a crash left behind
is swept by the next pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from api.routes.jobs import resolve_spec
from api.schemas import JobSpec
from core import retention
from core.store import Store, policies
from worker.runner import resumable

OWNER = "host:1"
pytestmark = pytest.mark.both_backends


@pytest.fixture
def store(tmp_path: Path, database_url: str) -> Store:
    return Store(database_url, tmp_path)


def claimed_job(store: Store) -> Any:
    echoed, config = resolve_spec(JobSpec.model_validate({"env_id": "SafetyPointCircle1-v0", "total_env_steps": 9000}))
    job, _ = store.create_job(client="c", spec=echoed, config=config, max_attempts=3, time_limit_s=60, labels={})
    assert store.claim(job.id, 1, OWNER, 60)
    return store.get_job(job.id)


def write_ckpt(run_dir: Path, step: int, payload: int = 10_000) -> Path:
    """A complete-looking checkpoint directory (manifest present) and its small artefact."""
    path = run_dir / "checkpoints" / f"ckpt_{step:010d}"
    path.mkdir(parents=True)
    (path / "arrays.npz").write_bytes(b"\0" * payload)
    (path / "manifest.json").write_text(json.dumps({"files": {}}))
    artefact = run_dir / "artefacts" / path.name
    artefact.mkdir(parents=True)
    (artefact / "policy.json").write_text("{}")
    return path


def register(store: Store, job: Any, step: int, reward: float, cost: float, feasible: bool) -> str:
    path = write_ckpt(Path(job.run_dir), step)
    metrics = {"epoch": step // 1000, "env_steps": step, "eval_return": reward, "eval_cost": cost, "feasible": feasible}
    ckpt_id = store.register_checkpoint(job.id, 1, OWNER, path, Path(job.run_dir) / "artefacts" / path.name, metrics)
    assert ckpt_id is not None
    return ckpt_id


def on_disk(job: Any) -> set[str]:
    return {p.name for p in (Path(job.run_dir) / "checkpoints").iterdir()}


def test_keeps_the_newest_the_best_and_promoted_and_marks_the_rest(store: Store) -> None:
    job = claimed_job(store)
    best = register(store, job, 1000, reward=50.0, cost=1.0, feasible=True)  # the best: feasible, highest return
    promoted = register(store, job, 2000, reward=5.0, cost=90.0, feasible=False)
    register(store, job, 3000, reward=7.0, cost=2.0, feasible=True)
    register(store, job, 4000, reward=9.0, cost=2.0, feasible=True)
    newest = register(store, job, 5000, reward=1.0, cost=95.0, feasible=False)
    with store.tx() as c:  # a policy promoted from ckpt 2000 (as POST /policies records it)
        c.execute(
            sa.insert(policies).values(
                id="pol_x", client="c", job_id=job.id, checkpoint_id=promoted, env_id=job.env_id, path="/nowhere",
                sha256="0" * 64, meta={}, created_at=0.0, ready=True,
            )
        )  # fmt: skip
    result = retention.apply(store, job.id, 1, OWNER, Path(job.run_dir), keep=1)
    assert result is not None and set(result.kept) == {best, promoted, newest}
    assert len(result.deleted) == 2 and result.freed_bytes >= 2 * 10_000
    rows = {ck.id: ck for ck in store.list_checkpoints(job.id)}
    assert {i for i, ck in rows.items() if ck.files_deleted_at is None} == {best, promoted, newest}
    assert on_disk(job) == {Path(rows[i].path).name for i in (best, promoted, newest)}
    assert len(list((Path(job.run_dir) / "artefacts").iterdir())) == 5, "every artefact stays"
    assert [ck.id for ck in resumable(store, job)] == [best, promoted, newest]


def test_a_fenced_attempt_deletes_nothing(store: Store) -> None:
    job = claimed_job(store)
    for step in (1000, 2000, 3000):
        register(store, job, step, reward=step, cost=0.0, feasible=True)
    assert retention.apply(store, job.id, 1, "another:2", Path(job.run_dir), keep=1) is None
    assert len(on_disk(job)) == 3 and all(ck.files_deleted_at is None for ck in store.list_checkpoints(job.id))


def test_crash_leftovers_are_swept_and_never_resumed_from(store: Store) -> None:
    job = claimed_job(store)
    run_dir = Path(job.run_dir)
    ids = [register(store, job, step, reward=step, cost=0.0, feasible=True) for step in (1000, 2000, 3000)]
    # A pass that crashed after marking ckpt 1000 but before deleting it, one killed mid-rmtree, a
    # checkpoint a killed attempt wrote but never registered, and a half-written one.
    with store.tx() as c:
        c.execute(sa.text("UPDATE checkpoints SET files_deleted_at = 1 WHERE id = :i"), {"i": ids[0]})
    (run_dir / "checkpoints" / ".deleting-ckpt_0000000500-999999").mkdir()
    write_ckpt(run_dir, 4000)  # unregistered
    (run_dir / "checkpoints" / ".tmp-ckpt_0000005000-999999").mkdir()
    incomplete = run_dir / "checkpoints" / "ckpt_0000002000" / "manifest.json"
    incomplete.unlink()  # not complete: resume must skip it even though its row is unmarked
    assert [ck.id for ck in resumable(store, job)] == [ids[2]], "marked and incomplete checkpoints are skipped"
    result = retention.apply(store, job.id, 1, OWNER, run_dir, keep=2)
    assert result is not None
    assert on_disk(job) == {"ckpt_0000002000", "ckpt_0000003000"}, "leftovers swept, the kept two stay"


def test_dir_bytes_counts_file_sizes(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x").write_bytes(b"1" * 1000)
    (tmp_path / "a" / "b" / "y").write_bytes(b"1" * 234)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "x")
    assert retention.dir_bytes(tmp_path) == 1234
    assert retention.dir_bytes(tmp_path / "missing") == 0


def test_disk_use_is_recorded_by_the_lease_holder_only(store: Store) -> None:
    job = claimed_job(store)
    big = 5 * 2**40  # past 32 bits: a BIGINT column on PostgreSQL
    assert store.record_disk_usage(job.id, 1, OWNER, big)
    assert not store.record_disk_usage(job.id, 1, "another:2", 1), "fenced"
    record = store.get_job(job.id)
    assert record.disk_bytes == big and record.disk_measured_at is not None
    assert store.disk_usage("c") == {job.id: big} and store.disk_usage("someone-else") == {}


def test_resume_falls_back_to_an_older_checkpoint_when_the_newest_fails_its_check(store: Store) -> None:
    from cvpo.checkpoint import CheckpointError
    from worker.runner import _restore_newest

    job = claimed_job(store)
    ids = [register(store, job, step, reward=step, cost=0.0, feasible=True) for step in (1000, 2000)]

    class Trainer:
        def __init__(self) -> None:
            self.tried: list[str] = []

        def restore(self, path: Path) -> None:
            self.tried.append(path.name)
            if path.name == "ckpt_0000002000":
                raise CheckpointError("arrays.npz fails its sha256 check")

    trainer = Trainer()
    restored = _restore_newest(trainer, resumable(store, job))
    assert restored is not None and restored.id == ids[0]
    assert trainer.tried == ["ckpt_0000002000", "ckpt_0000001000"]


MY_COLUMNS = {
    "jobs": {"disk_bytes", "disk_measured_at"},
    "checkpoints": {"files_deleted_at"},
    "policies": {"meta_sha256"},
}


def test_an_existing_store_gains_the_retention_and_integrity_columns(tmp_path: Path, database_url: str) -> None:
    """A store made before these columns existed starts with them added (null in its old rows)."""
    from core import store as store_module

    old = sa.MetaData()
    for table in store_module.metadata.sorted_tables:
        sa.Table(table.name, old, *[c.copy() for c in table.columns if c.name not in MY_COLUMNS.get(table.name, ())])
    engine = store_module.make_engine(database_url)
    old.create_all(engine)
    with engine.begin() as c:
        c.execute(
            old.tables["policies"].insert().values(
                id="pol_old", client="c", env_id="SafetyPointCircle1-v0", path="/nowhere", sha256="0" * 64,
                meta={}, created_at=1.0, ready=True,
            )
        )  # fmt: skip
        c.execute(
            old.tables["checkpoints"]
            .insert()
            .values(id="ckpt_old", job_id="job_old", attempt=1, epoch=0, env_step=10, path="/nowhere", created_at=1.0)
        )
    engine.dispose()
    migrated = Store(database_url, tmp_path)
    assert sorted(migrated.migrated) == sorted(f"{t}.{c}" for t, cols in MY_COLUMNS.items() for c in cols)
    assert migrated.get_policy("pol_old").meta_sha256 is None, "an old policy: checked on its weights only"
    assert migrated.list_checkpoints("job_old")[0].files_deleted_at is None
