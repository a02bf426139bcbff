"""The repository itself: what must never be committed, and what a fresh clone needs beside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_data_dir_with_the_admin_token_is_git_ignored() -> None:
    """cvpo-data/ holds the admin token and the database (issue #23 item 8): `git add -A` must skip it."""
    data_dir = Settings().data_dir
    for name in ("api_token", "cvpo.db", "runs/job_x/metrics.jsonl"):
        path = (ROOT / data_dir / name).relative_to(ROOT)
        result = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
        assert result.returncode == 0, f"{path} is not git-ignored"


def test_no_test_or_code_reads_a_folder_outside_the_repository() -> None:
    """A fresh clone with nothing beside it passes the suite (issue #19 item 7)."""
    offenders = []
    for path in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("cvpo/**/*.py"), *ROOT.glob("bench/**/*.py")]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        if "shared/data" in text or "shared/docs" in text or "../shared" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
