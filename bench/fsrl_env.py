"""FSRL (fast-safe-rl 0.1.0) in its own virtualenv, never a project dependency.

``ensure_venv()`` builds ``.venv-fsrl`` in the repo root (git-ignored) with the recipe of
reference-results.md §5: the same torch/numpy/gymnasium/mujoco pins as the project, safety-gymnasium
without its broken pins, then ``fast-safe-rl==0.1.0 tianshou==0.5.1`` with the pins repeated so pip
keeps them, ``setuptools<81`` (FSRL imports wandb, which needs ``pkg_resources``) and ``sentry-sdk==1.45.1``
(wandb 0.14 imports ``sentry_sdk.Hub``, gone in sentry-sdk 3.0). A stamp file
skips the work when the recipe has not changed.

    .venv/bin/python bench/fsrl_env.py        # build (or check) the FSRL virtualenv
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-fsrl"
PYTHON = VENV / "bin" / "python"
# Pins shared with pyproject.toml, repeated in every pip call so FSRL's own requirements cannot move them.
PINS = (
    "torch==2.13.0",
    "numpy==1.26.4",
    "gymnasium==0.28.1",
    "mujoco==2.3.3",
    "imageio==2.38.1",
    "xmltodict==1.0.4",
    "pyyaml==6.0.3",
    "scipy==1.17.1",
)
STEPS: tuple[tuple[str, ...], ...] = (
    PINS,
    ("--no-deps", "safety-gymnasium==1.0.0"),
    # sentry-sdk 3.0 removed ``Hub``, which wandb 0.14 (FSRL's pin) imports at ``import fsrl``.
    ("fast-safe-rl==0.1.0", "tianshou==0.5.1", "setuptools<81", "sentry-sdk==1.45.1", *PINS),
)


def _stamp() -> str:
    return hashlib.sha256(repr(STEPS).encode()).hexdigest()


def ensure_venv(quiet: bool = False) -> Path:
    """Create/refresh ``.venv-fsrl`` if its stamp differs from the recipe; return its python."""
    stamp_file = VENV / ".fsrl-installed"
    if PYTHON.exists() and stamp_file.exists() and stamp_file.read_text().strip() == _stamp():
        return PYTHON
    if not PYTHON.exists():
        print(f"fsrl_env: creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for step in STEPS:
        print(f"fsrl_env: pip install {' '.join(step)}", flush=True)
        cmd = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", *(["-q"] if quiet else []), *step]
        subprocess.run(cmd, check=True)
    check = (
        "import fsrl, tianshou, torch, numpy; "
        "print(fsrl.__version__, tianshou.__version__, torch.__version__, numpy.__version__)"
    )
    out = subprocess.run([str(PYTHON), "-c", check], check=True, capture_output=True, text=True)
    print(f"fsrl_env: fsrl, tianshou, torch, numpy = {out.stdout.strip()}", flush=True)
    stamp_file.write_text(_stamp() + "\n")
    return PYTHON


if __name__ == "__main__":
    ensure_venv()
