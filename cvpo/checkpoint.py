"""Full-training-state checkpoints: atomic, sha256-manifested, loaded without unpickling code.

A checkpoint directory holds
- ``state.pt``: tensors and plain values (networks, optimisers, RNG states), written with
  ``torch.save`` and read with ``torch.load(weights_only=True)``, which refuses arbitrary objects;
- ``arrays.npz``: numpy arrays (replay buffer, normaliser), read with ``allow_pickle=False``;
- ``meta.json``: counters, duals, config, metrics summary;
- ``manifest.json``: sha256 of each file, checked before anything is deserialised.

It is written into a temporary sibling directory, fsynced, then renamed into place, so a crash
leaves either the old set of checkpoints or the new one, never a half-written directory
(service-design.md §3.5).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or fails its sha256 check."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a checkpoint directory atomically; an existing one at ``path`` is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    np.savez(tmp / ARRAYS_FILE, **arrays)
    (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
    files = {name: sha256_file(tmp / name) for name in (STATE_FILE, ARRAYS_FILE, META_FILE)}
    (tmp / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))
    for name in (*files, MANIFEST_FILE):
        _fsync(tmp / name)
    _fsync(tmp)
    if path.exists():
        old = path.parent / f".old-{path.name}-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    _fsync(path.parent)
    return path


def verify_checkpoint(path: Path) -> dict[str, str]:
    """Check every file against the manifest; return the manifest's hashes."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST_FILE})")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MANIFEST_FILE} ({exc})") from exc
    # The manifest must cover exactly the files that get loaded: one listing fewer (or none) would let
    # unverified files through.
    required = {STATE_FILE, ARRAYS_FILE, META_FILE}
    if not isinstance(files, dict) or set(files) != required or not all(isinstance(d, str) for d in files.values()):
        raise CheckpointError(f"{path}: {MANIFEST_FILE} must list sha256 digests for exactly {sorted(required)}")
    for name, digest in files.items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path}: {name} fails its sha256 check (tampered or corrupt)")
    return files


def load_checkpoint(
    path: Path, map_location: str = "cpu"
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Verify, then load (state, arrays, meta) without unpickling arbitrary objects."""
    path = Path(path)
    verify_checkpoint(path)
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    with np.load(path / ARRAYS_FILE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    return state, arrays, meta


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest first (by name: ckpt_<epoch>)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("ckpt_") and (p / MANIFEST_FILE).is_file())
