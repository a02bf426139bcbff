"""Checkpoint retention and run-directory sizes (issue #23 item 11), applied by the worker.

Every full checkpoint holds the replay buffer's filled part (hundreds of MB for a navigation task at
1 M steps), and a run writes one per epoch. After each new checkpoint the worker keeps the newest
``keep`` (CVPO_KEEP_CHECKPOINTS), the best one by the store's ranking (``rank_key``: the trainer's
own rule) and any a policy was promoted from, and deletes the other full checkpoint directories.
Their policy artefacts (``<run_dir>/artefacts/ckpt_…``, a few hundred KB) stay: certification
candidates and promotion read those, never the full checkpoint.

Crash safety: a checkpoint is marked deleted in the store (``files_deleted_at``) before its
directory goes, and the directory is renamed to ``.deleting-…`` before ``rmtree``, so resume (the
newest registered, unmarked, complete checkpoint) never meets a half-deleted one; leftovers of a
crash (marked rows whose directory remains, ``.deleting-``/``.tmp-``/``.old-`` directories of dead
processes, complete checkpoints no row registered) are swept by the next pass. Torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.certification import rank_key
from core.store import CheckpointRecord, Store

log = logging.getLogger("cvpo.worker")

SCRATCH_PREFIXES = (".deleting-", ".tmp-", ".old-")  # ours and cvpo.checkpoint.save_checkpoint's


@dataclass
class RetentionResult:
    kept: list[str] = field(default_factory=list)  # checkpoint ids whose files stay
    deleted: list[str] = field(default_factory=list)  # checkpoint ids whose files went in this pass
    freed_bytes: int = 0


def dir_bytes(path: Path) -> int:
    """Apparent size (sum of file sizes) under ``path``, symlinks not followed; 0 if it is gone.
    A file vanishing mid-walk (retention, an atomic rename) is skipped, never an error."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def choose(ckpts: list[CheckpointRecord], keep: int, promoted: set[str]) -> tuple[set[str], list[CheckpointRecord]]:
    """(ids to keep, records to delete) among the checkpoints whose files still exist."""
    live = [ck for ck in ckpts if ck.files_deleted_at is None]
    kept = {ck.id for ck in live[-max(1, keep) :]}
    if live:
        kept.add(min(live, key=rank_key).id)  # min keeps the first of equals: stable across passes
    kept |= promoted & {ck.id for ck in live}
    return kept, [ck for ck in live if ck.id not in kept]


def _remove(path: Path) -> int:
    """Rename out of the way (atomic: the checkpoint is whole or absent at its name), then delete."""
    trash = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return 0
    size = dir_bytes(trash)
    shutil.rmtree(trash, ignore_errors=True)
    return size


def apply(store: Store, job_id: str, attempt: int, owner: str, run_dir: Path, keep: int) -> RetentionResult | None:
    """One retention pass for this attempt's job. None if fenced (the lease went to another attempt)."""
    ckpts = store.list_checkpoints(job_id)
    kept, doomed = choose(ckpts, keep, store.promoted_checkpoint_ids(job_id))
    marked = store.retire_checkpoints(job_id, attempt, owner, [ck.id for ck in doomed])
    if marked is None:
        return None
    result = RetentionResult(kept=sorted(kept))
    keep_paths = {Path(ck.path).resolve() for ck in ckpts if ck.id in kept}
    marked_ids = {ck.id for ck in marked}
    # Rows marked now, and rows marked by a pass a crash interrupted before their files went.
    gone = [ck for ck in ckpts if ck.id in marked_ids or ck.files_deleted_at is not None]
    for ck in gone:
        path = Path(ck.path)
        if path.resolve() in keep_paths:  # a later attempt rewrote the same directory: it is kept
            continue
        freed = _remove(path)
        if ck.id in marked_ids:
            result.deleted.append(ck.id)
        result.freed_bytes += freed
    result.freed_bytes += _sweep(run_dir / "checkpoints", keep_paths, {Path(ck.path).resolve() for ck in ckpts})
    if result.deleted:
        log.info(
            "job %s: deleted %d old checkpoint(s) (%d bytes), kept %s",
            job_id,
            len(result.deleted),
            result.freed_bytes,
            ", ".join(Path(ck.path).name for ck in ckpts if ck.id in kept),
        )
    return result


def _sweep(root: Path, keep_paths: set[Path], registered: set[Path]) -> int:
    """Scratch directories of dead processes, and complete checkpoints no attempt registered (written
    by an attempt killed before it could register them: no row will ever name them)."""
    freed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    mine = f"-{os.getpid()}"
    for entry in entries:
        name = entry.name
        if name.startswith(SCRATCH_PREFIXES) and not name.endswith(mine):
            freed += dir_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith("ckpt_") and entry.resolve() not in registered and entry.resolve() not in keep_paths:
            freed += _remove(entry)
    return freed
