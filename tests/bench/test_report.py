"""bench/report.py: numbers come from the JSON/TOML inputs, budgets are compared, the FSRL hook fills in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.report import ReportError, budget_sentence, load_reference, main

REFERENCE = Path(__file__).resolve().parents[2] / "bench" / "reference_results.toml"


def summary(n_seeds: int = 5, eval_episodes: int = 10) -> dict[str, Any]:
    return {
        "benchmark": "grid",
        "time": "2026-01-01T00:00:00Z",
        "machine": {"cpus": 2, "processor": "x86_64", "torch": "2.13.0+cpu"},
        "grid": "demo",
        "grid_path": "bench/grids/demo.toml",
        "grid_file": {"seeds": list(range(n_seeds)), "cost_limit": 25, "overrides": {}},
        "confidence": 0.95,
        "n_resamples": 10000,
        "runs": {"planned": n_seeds, "finished": n_seeds},
        "tasks": {
            "SafetyPointGoal1-v0": {
                "n_seeds": n_seeds,
                "seeds": list(range(n_seeds)),
                "budget_env_steps": 1_000_000,
                "cost_limit": 25.0,
                "preset": "navigation",
                "plot": "plots/SafetyPointGoal1-v0.png",
                "eval_return": {"mean": 12.3456, "ci_low": 10.5, "ci_high": 14.25},
                "eval_cost": {"mean": 31.5, "ci_low": 20.25, "ci_high": 44.0},
                "feasible_fraction": 0.4,
                "feasible_seeds": 2,
                "eval_episodes": eval_episodes,
                "env_steps": {"min": 1_000_000, "max": 1_000_000},
                "wall_time_s": {"mean": 36_000.0, "max": 40_000.0, "total": 180_000.0},
                "env_steps_per_s": 27.8,
            }
        },
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    grid_dir = tmp_path / "results" / "demo"
    grid_dir.mkdir(parents=True)
    (grid_dir / "summary.json").write_text(json.dumps(data))
    return grid_dir


def test_report_takes_every_number_from_the_inputs(tmp_path: Path) -> None:
    grid_dir = write(tmp_path, summary())
    out = tmp_path / "docs" / "benchmarks.md"
    assert main([str(grid_dir), "--out", str(out), "--fsrl-dir", str(tmp_path)]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| SafetyPointGoal1-v0 |"))
    assert "12.3 [10.5, 14.2]" in row and "31.5 [20.2, 44.0]" in row and "40 % (2/5)" in row
    assert "10.0 h" in row  # 36 000 s
    assert "![SafetyPointGoal1-v0" in text and "(../results/demo/plots/SafetyPointGoal1-v0.png)" in text
    # Published rows beside ours, as published, with source and budget.
    assert "| OmniSafe off-policy | SACLag | 3 M | 5 | not stated | 25 | 21.45 ± 6.97 | 19.17 ± 9.72 |" in text
    assert "| FSRL curves | CVPO | 5 M | 3 | training | 25 | ≈24 | ≈27–30 |" in text
    assert "Budgets differ: our runs stopped at 1 M env steps per seed" in text
    assert "Not a performance result" not in text  # 5 seeds, 10 eval episodes, all finished
    assert "Pending: no `bench/results/vs_fsrl*.json` yet" in text


def test_report_flags_small_grids(tmp_path: Path) -> None:
    grid_dir = write(tmp_path, summary(n_seeds=2, eval_episodes=2))
    out = tmp_path / "b.md"
    assert main([str(grid_dir), "--out", str(out), "--fsrl-dir", str(tmp_path)]) == 0
    text = out.read_text()
    assert "Not a performance result" in text and "fewer than 5 finished seeds" in text
    assert "fewer than 10 evaluation episodes" in text


def test_unknown_side_by_side_json_is_rendered_generically(tmp_path: Path) -> None:
    grid_dir = write(tmp_path, summary())
    fsrl = {
        "benchmark": "vs_fsrl_other",
        "rows": [
            {"task": "SafetyPointCircle1-v0", "impl": "fsrl", "env_steps_per_s": 139.25},
            {
                "task": "SafetyPointCircle1-v0",
                "impl": "cvpo-service",
                "eval_return": {"mean": 5.0, "ci_low": 4.0, "ci_high": 6.0},
            },
        ],
    }
    (tmp_path / "vs_fsrl_other.json").write_text(json.dumps(fsrl))
    out = tmp_path / "b.md"
    assert main([str(grid_dir), "--out", str(out), "--fsrl-dir", str(tmp_path)]) == 0
    text = out.read_text()
    assert "Pending" not in text
    assert "| task | impl | env_steps_per_s | eval_return |" in text
    assert "| SafetyPointCircle1-v0 | fsrl | 139 | – |" in text
    assert "| SafetyPointCircle1-v0 | cvpo-service | – | 5.00 [4.00, 6.00] |" in text


def test_throughput_and_learning_side_by_side_get_their_own_tables(tmp_path: Path) -> None:
    grid_dir = write(tmp_path, summary())
    throughput = {
        "benchmark": "vs_fsrl",
        "machine": {"threads": 2},
        "window_env_steps": 20000,
        "medians": {
            "SafetyPointGoal1-v0": {
                "median_env_steps_per_s": {"fsrl-stock": 200.0, "fsrl-fast": 250.0, "ours": 600.0},
                "ratios": {"ours_vs_fsrl-stock": 3.0, "ours_vs_fsrl-fast": 2.4},
            }
        },
        "rows": [
            {
                "impl": "ours",
                "config": {
                    "network": {"critic_hidden": [64, 32], "reward_critics": 2},
                    "algo": {"num_samples": 8, "batch_size": 128, "updates_per_step": 0.25},
                    "constraints": {"cost_limits": [25.0]},
                    "huge": list(range(50)),
                },
            }
        ],
    }

    def arm(ret: float, cost: float, sps: float, feasible: float) -> dict[str, Any]:
        ci = lambda m: {"n": 5, "mean": m, "ci95_low": m - 1, "ci95_high": m + 1}  # noqa: E731
        return {
            "eval_return": ci(ret),
            "eval_cost": ci(cost),
            "env_steps_per_s": ci(sps),
            "feasible_fraction": feasible,
        }

    learning = {
        "benchmark": "vs_fsrl_learning",
        "settings": {"task": "SafetyPointCircle1-v0", "budget": 50000, "eval_episodes": 10, "threads": 1, "jobs": 2},
        "seeds": [0, 1, 2, 3, 4],
        "cost_limit": 25.0,
        "summary": {
            "fsrl": arm(20.0, 30.0, 100.0, 0.4),
            "ours": arm(25.0, 15.0, 250.0, 0.8),
            "ratio_env_steps_per_s": 2.5,
        },
        "runs": [{"arm": "ours", "seed": 0, "config": {"huge": True}}],
    }
    (tmp_path / "vs_fsrl.json").write_text(json.dumps(throughput))
    (tmp_path / "vs_fsrl_learning.json").write_text(json.dumps(learning))
    out = tmp_path / "b.md"
    assert main([str(grid_dir), "--out", str(out), "--fsrl-dir", str(tmp_path)]) == 0
    text = out.read_text()
    assert "| SafetyPointGoal1-v0 | 200 | 250 | 600 | 3.00× | 2.40× |" in text
    assert "| FSRL CVPO (fast-safe-rl 0.1.0, stock) | 5 | 50 k | 20.0 [19.0, 21.0] | 30.0 [29.0, 31.0] | 40% |" in text
    assert "| this repo's CVPO | 5 | 50 k | 25.0 [24.0, 26.0] | 15.0 [14.0, 16.0] | 80% | 250 [249, 251] |" in text
    assert "ours ÷ FSRL: **2.50×**" in text
    assert "cost limit 25," in text
    assert "huge" not in text  # per-run configs stay in the JSON
    # the sizes in the sentence are read from our row's config, not typed into the report
    assert "(64×32, 2 reward critic(s) and 1 cost critic(s), K 8, batch 128, 0.25 updates per step)" in text


def test_budget_sentence_says_when_budgets_match_or_differ() -> None:
    sources = {"a": {"name": "A", "budget_env_steps": 1_000_000}, "b": {"name": "B", "episodes": "training"}}
    same = [{"task": "T", "source": "a", "method": "M"}]
    assert budget_sentence("T", 1_000_000, same, sources).startswith("Budgets match")
    more = [*same, {"task": "T", "source": "b", "method": "M", "budget_env_steps": 5_000_000}]
    text = budget_sentence("T", 1_000_000, more, sources)
    assert "A 1 M (same as ours)" in text and "B 5 M (5× ours)" in text and "training episodes" in text
    assert "No published numbers" in budget_sentence("T", 1, [], sources)


def test_reference_table_is_valid_and_covers_the_standard_tasks() -> None:
    data = load_reference(REFERENCE)
    tasks = {r["task"] for r in data["reference"]}
    assert {"SafetyPointGoal1-v0", "SafetyPointCircle1-v0", "SafetyHalfCheetahVelocity-v1"} <= tasks


def test_reference_loader_rejects_unknown_source(tmp_path: Path) -> None:
    bad = tmp_path / "ref.toml"
    bad.write_text('[sources.a]\nname = "A"\n[[reference]]\ntask = "T"\nsource = "b"\nmethod = "M"\nreturn = 1\n')
    with pytest.raises(ReportError, match="unknown source 'b'"):
        load_reference(bad)


def test_missing_summary_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "b.md")]) == 2
    assert "run bench/grid.py first" in capsys.readouterr().err


def test_ablation_table_puts_the_arms_side_by_side(tmp_path: Path) -> None:
    base, arm = summary(), summary()
    base["grid"], arm["grid"] = "base", "arm"
    t = arm["tasks"]["SafetyPointGoal1-v0"]
    t.update(feasible_seeds=4, eval_return={"mean": 9.0, "ci_low": 8.0, "ci_high": 10.0})
    t["trust"] = {
        "eval_cost_stochastic": {"mean": 18.5, "ci_low": 12.0, "ci_high": 25.0},
        "policy_std": {"mean": 0.61},
        "lambda_at_cap_share": {"mean": 0.37},
        "critic_cost_predicted": {"mean": 4.5},
        "critic_cost_realised": {"mean": 6.25},
    }
    dirs = []
    for data in (base, arm):
        d = tmp_path / "results" / data["grid"]
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(data))
        dirs.append(str(d))
    abl = tmp_path / "abl"
    abl.mkdir()
    (abl / "x.toml").write_text(
        'title = "T"\nbaseline = "base"\n[[arms]]\ngrid = "base"\nlabel = "B"\n'
        '[[arms]]\ngrid = "arm"\nlabel = "A"\n[[arms]]\ngrid = "later"\nlabel = "L"\n'
    )
    out = tmp_path / "b.md"
    assert main([*dirs, "--out", str(out), "--fsrl-dir", str(tmp_path), "--ablations-dir", str(abl)]) == 0
    text = out.read_text()
    assert "## Ablation: T" in text and "- `later`: L — **not run yet**" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| `")}
    # The bar is the baseline's lower CI bound (10.5): the arm's 9.0 misses it, the baseline's 12.3 meets it.
    assert rows["| `arm`"].startswith("| `arm` | 5 | 4/5 | 9.00 [8.00, 10.0] ✗ | 31.5 [20.2, 44.0] | 18.5 [12.0, 25.0]")
    assert "| 0.61 | 0.37 | 4.50 / 6.25 |" in rows["| `arm`"]
    assert rows["| `base`"].startswith("| `base` | 5 | 2/5 | 12.3 [10.5, 14.2] ✓ |")
    assert rows["| `base`"].endswith("| – | – | – | – |")


def test_a_bad_ablation_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid_dir = write(tmp_path, summary())
    abl = tmp_path / "abl"
    abl.mkdir()
    (abl / "x.toml").write_text('title = "no arms"\n')
    assert main([str(grid_dir), "--out", str(tmp_path / "b.md"), "--ablations-dir", str(abl)]) == 2
    assert "not an ablation file" in capsys.readouterr().err
