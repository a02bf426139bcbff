"""The compatibility layer is needed, works, and is the only import path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_plain_import_fails_on_this_python_and_compat_import_works() -> None:
    plain = run_python("import safety_gymnasium")
    assert plain.returncode != 0
    assert "mutable default" in plain.stderr
    fixed = run_python(
        "import dataclasses, sys\n"
        "orig = dataclasses._get_field\n"
        "from cvpo.envs.compat import safety_gymnasium\n"
        "sg = safety_gymnasium()\n"
        "assert dataclasses._get_field is orig, 'patch leaked'\n"
        "assert 'gymnasium_robotics' not in sys.modules, 'stand-in leaked'\n"
        "@dataclasses.dataclass\n"
        "class Mine:\n"
        "    pass\n"
        "import numpy as np\n"
        "try:\n"
        "    dataclasses.make_dataclass('X', [('c', np.ndarray, dataclasses.field(default=np.zeros(2)))])\n"
        "except ValueError:\n"
        "    print('still strict')\n"
        "print(sg.__version__)\n"
    )
    assert fixed.returncode == 0, fixed.stderr
    assert "still strict" in fixed.stdout  # other code keeps Python 3.11's check
    assert "1.0.0" in fixed.stdout


def test_import_before_compat_is_refused() -> None:
    out = run_python(
        "import sys, types\n"
        "sys.modules['safety_gymnasium'] = types.ModuleType('safety_gymnasium')\n"
        "from cvpo.envs.compat import safety_gymnasium\n"
        "safety_gymnasium()\n"
    )
    assert out.returncode != 0
    assert "only through cvpo.envs.compat" in out.stderr


def test_multi_agent_make_fails_clearly() -> None:
    from cvpo.envs.compat import safety_gymnasium

    with pytest.raises(RuntimeError, match="gymnasium-robotics"):
        safety_gymnasium().make_ma("Ant", "2x4")


def test_no_module_imports_safety_gymnasium_directly() -> None:
    pattern = re.compile(r"^\s*(import safety_gymnasium|from safety_gymnasium\b)", re.MULTILINE)
    offenders = []
    for top in ("cvpo", "core", "api", "worker", "service", "bench", "tests"):
        for path in (REPO / top).rglob("*.py"):
            if path.name != "compat.py" and pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
