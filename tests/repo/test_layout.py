"""The import direction of the packages (issue #19): cvpo → core → api | worker → service → bench.
``cvpo_client`` stands apart: the standard library and NumPy only (issue #20), so users install it without
torch and the service's dependencies.

The engine is a library that imports nothing of the service; ``core`` holds what the API and the worker
share; the API and the worker never import each other; only ``service`` (the composition root) sees both.
Checked statically over every import statement, function-level ones included, and by importing each
lower package in a clean interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Package → the project packages it must never import.
FORBIDDEN = {
    "cvpo": {"core", "api", "worker", "service", "bench"},
    "core": {"api", "worker", "service", "bench"},
    "api": {"worker", "service", "bench"},
    "worker": {"api", "service", "bench"},
    "service": {"bench"},
    "bench": {"tests"},  # benchmarks may use every package, never the test suite's helpers
    "cvpo_client": {"cvpo", "core", "api", "worker", "service", "bench", "tests", "torch", "httpx"},
}


def imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up_or_sideways(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_tops(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package", ["cvpo", "core", "cvpo_client"])
def test_importing_a_lower_package_loads_nothing_above_it(package: str) -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        f"for m in pkgutil.walk_packages(pkg.__path__, {package!r} + '.'):\n"
        "    if not m.name.endswith('.compat'):\n"  # the simulator's import shim loads safety-gymnasium only
        "        importlib.import_module(m.name)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout.splitlines()[-1])) & FORBIDDEN[package] == set()


def test_the_client_imports_only_the_standard_library_and_numpy() -> None:
    """Statically (every import statement) and at run time (a clean interpreter importing it)."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "cvpo_client", "__future__"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_tops(path) - allowed)
        for path in sorted((ROOT / "cvpo_client").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import cvpo_client\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in set(sys.modules) - before})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.splitlines()[-1])) - allowed
    # NumPy's compiled parts register private top-level modules (``_cython_3_0_8``, ``cython_runtime``).
    assert {n for n in loaded if not n.startswith(("_", "cython"))} == set()


def test_bench_is_a_package_that_never_edits_sys_path() -> None:
    """bench/ modules import each other as bench.<module>; a sys.path insert would let one module load
    twice under two names (``stats`` and ``bench.stats``), and hides what a benchmark depends on."""
    assert (ROOT / "bench" / "__init__.py").is_file()
    offenders = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend"):
                target = node.value
                is_sys_path = isinstance(target, ast.Attribute) and target.attr == "path"
                if is_sys_path and getattr(target.value, "id", "") == "sys":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
