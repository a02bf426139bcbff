"""Checkpoints: atomic round trip, sha256 manifest, and no code execution on load."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cvpo.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint


def sample_state() -> tuple[dict, dict, dict]:
    state = {"net": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": torch.get_rng_state(), "n": 3, "x": [1.5, 2]}
    arrays = {"buffer.obs": np.arange(12, dtype=np.float32).reshape(4, 3), "flag": np.array([True, False])}
    return state, arrays, {"epoch": 2, "config": {"seed": 1}}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    state, arrays, meta = sample_state()
    path = save_checkpoint(tmp_path / "checkpoints" / "ckpt_0000000100", state, arrays, meta)
    loaded_state, loaded_arrays, loaded_meta = load_checkpoint(path)
    assert torch.equal(loaded_state["net"]["w"], state["net"]["w"])
    assert torch.equal(loaded_state["rng"], state["rng"])
    assert loaded_state["n"] == 3 and loaded_state["x"] == [1.5, 2]
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded_arrays[k], v)
        assert loaded_arrays[k].dtype == v.dtype
    assert loaded_meta["epoch"] == 2 and loaded_meta["config"] == {"seed": 1}
    assert list_checkpoints(tmp_path) == [path]
    assert not any(p.name.startswith(".tmp") for p in path.parent.iterdir())


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    state, arrays, meta = sample_state()
    path = save_checkpoint(tmp_path / "ckpt_1", state, arrays, meta)
    save_checkpoint(path, state, arrays, {**meta, "epoch": 3})
    assert load_checkpoint(path)[2]["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1"]


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    state, arrays, meta = sample_state()
    path = save_checkpoint(tmp_path / "ckpt_1", state, arrays, meta)
    data = bytearray((path / "arrays.npz").read_bytes())
    data[-10] ^= 0xFF
    (path / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "manifest",
    [{"files": {}}, {"files": {"meta.json": None}}, {"nope": 1}, [], "not json", {"files": {"../x": "0" * 64}}],
)
def test_a_manifest_that_does_not_cover_every_file_is_invalid(tmp_path: Path, manifest: object) -> None:
    """Issue #23 item 10: a manifest listing no files verified nothing, and the files were loaded anyway."""
    state, arrays, meta = sample_state()
    path = save_checkpoint(tmp_path / "ckpt_1", state, arrays, meta)
    good = json.loads((path / "manifest.json").read_text())["files"]
    if isinstance(manifest, dict) and manifest.get("files") == {"meta.json": None}:
        manifest = {"files": {"meta.json": good["meta.json"]}}  # one file verified, two not
    (path / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)


class Planted:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_never_runs(tmp_path: Path) -> None:
    state, arrays, meta = sample_state()
    path = save_checkpoint(tmp_path / "ckpt_1", state, arrays, meta)
    marker = tmp_path / "pwned"
    # An attacker replaces state.pt with a pickle that runs a command, and fixes the manifest.
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"net": Planted(str(marker))}, f)
    manifest = json.loads((path / "manifest.json").read_text())
    from cvpo.checkpoint import sha256_file

    manifest["files"]["state.pt"] = sha256_file(path / "state.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception):  # noqa: B017 - torch raises UnpicklingError or RuntimeError by version
        load_checkpoint(path)
    assert not marker.exists()


def test_incomplete_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "ckpt_0000000001").mkdir(parents=True)
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "ckpt_0000000001")
