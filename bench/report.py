"""Generate docs/benchmarks.md from grid summaries and the curated published numbers.

    .venv/bin/python -m bench.report [results/standard results/smoke ...] [--out docs/benchmarks.md]

Every number in the report comes from a JSON or TOML file: ``<grid dir>/summary.json`` (written
by bench/grid.py), ``bench/reference_results.toml`` (published numbers, each with its source and
budget) and, when present, ``bench/results/vs_fsrl*.json`` (the side-by-side with FSRL's CVPO).
With no grid dirs given, every ``results/*/summary.json`` is used, the largest grids first.

Ablations (``bench/ablations/*.toml``): each names its arms (grids) and a baseline; the report puts the
arms' final numbers side by side per task, before the grids' own sections.

The FSRL side-by-side: each ``vs_fsrl*.json`` is rendered by its ``benchmark`` field —
``vs_fsrl`` (bench/vs_fsrl.py, throughput) and ``vs_fsrl_learning`` (bench/vs_fsrl_learning.py,
learning at equal budget) as tables of their own; any other file generically, its top-level scalars
as a list and every list of row objects as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT / "bench" / "reference_results.toml"
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
FSRL_GLOB = "vs_fsrl*.json"
MIN_SEEDS, MIN_EVAL_EPISODES = 5, 10  # what issue #8 asks of a reported result


class ReportError(Exception):
    """A missing or malformed input file: one line for the user, exit 2."""


# ------------------------------------------------------------------ inputs


def load_reference(path: Path) -> dict[str, Any]:
    """The curated table, checked so a typo (unknown source, missing value) fails loudly here."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    sources = data.get("sources", {})
    for i, ref in enumerate(data.get("reference", [])):
        where = f"{path}: reference #{i + 1} ({ref.get('task')}, {ref.get('method')})"
        for key in ("task", "source", "method"):
            if key not in ref:
                raise ReportError(f"{where}: missing {key!r}")
        if ref["source"] not in sources:
            raise ReportError(f"{where}: unknown source {ref['source']!r}; known: {sorted(sources)}")
        if "return" not in ref and "return_range" not in ref:
            raise ReportError(f"{where}: give return or return_range")
        if "budget_env_steps" not in ref and "budget_env_steps" not in sources[ref["source"]]:
            raise ReportError(f"{where}: no budget_env_steps (neither on the entry nor its source)")
    return data


def load_summaries(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for d in dirs:
        path = d / "summary.json" if d.is_dir() else d
        try:
            out.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"cannot read grid summary {path}: {exc} (run bench/grid.py first)") from exc
    return out


# ------------------------------------------------------------------ formatting


def fmt_num(x: float | None) -> str:
    """Digits by magnitude: returns span 1e-2 (costs) to 1e4 (velocity returns)."""
    if x is None:
        return "–"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}".replace(",", " ")
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{fmt_num(d['mean'])} [{fmt_num(d['ci_low'])}, {fmt_num(d['ci_high'])}]"


def fmt_steps(n: float) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:g} M"
    if n >= 1_000:
        return f"{n / 1e3:g} k"
    return f"{n:g}"


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _pub(x: float) -> str:
    """A published number as published (no re-rounding; TOML keeps no trailing zeros)."""
    return f"{x:g}" if abs(x) < 1e6 else f"{x:.6g}"


def _ref_value(ref: dict[str, Any], key: str) -> str:
    approx = "≈" if ref.get("approx") else ""
    if f"{key}_range" in ref:
        lo, hi = ref[f"{key}_range"]
        return f"{approx}{_pub(lo)}–{_pub(hi)}"
    if key not in ref:
        return "–"
    value = f"{approx}{_pub(ref[key])}"
    return f"{value} ± {_pub(ref[key + '_std'])}" if f"{key}_std" in ref else value


def _budget(ref: dict[str, Any], sources: dict[str, Any]) -> int:
    return int(ref.get("budget_env_steps", sources[ref["source"]].get("budget_env_steps", 0)))


def _cost_limit(ref: dict[str, Any], sources: dict[str, Any]) -> float:
    return float(ref.get("cost_limit", sources[ref["source"]].get("cost_limit", 25)))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


# ------------------------------------------------------------------ sections


def budget_sentence(task: str, ours: int, refs: list[dict[str, Any]], sources: dict[str, Any]) -> str:
    """The honest caveat: how each reference's budget, episodes and limit differ from ours."""
    if not refs:
        return f"No published numbers for {task} are in bench/reference_results.toml."
    budgets: dict[str, int] = {}
    for ref in refs:
        budgets.setdefault(f"{sources[ref['source']]['name']} ({ref['method']})", _budget(ref, sources))
    by_budget: dict[int, list[str]] = {}
    for name, b in budgets.items():
        by_budget.setdefault(b, []).append(name)
    if set(by_budget) == {ours}:
        text = f"Budgets match: every reference row used {fmt_steps(ours)} env steps, as ours did."
    else:
        parts = []
        for b in sorted(by_budget):
            srcs = sorted({n.split(" (")[0] for n in by_budget[b]})
            r = b / ours
            times = f"{r:,.0f}".replace(",", " ") if r >= 10 else f"{r:.2g}"
            ratio = "same as ours" if b == ours else f"{times}× ours"
            parts.append(f"{', '.join(srcs)} {fmt_steps(b)} ({ratio})")
        text = (
            f"Budgets differ: our runs stopped at {fmt_steps(ours)} env steps per seed, the references used "
            f"{'; '.join(parts)}. Rows at a larger budget show where a converged run should end up, "
            "not a like-for-like result at ours."
        )
    if any(sources[r["source"]].get("episodes") == "training" for r in refs):
        text += (
            " FSRL's values are by-eye readings of training episodes (stochastic policy), ours are "
            "deterministic evaluation episodes."
        )
    if any(_cost_limit(r, sources) != 25 for r in refs):
        text += " Rows with another cost limit are context only: they optimise a different constraint."
    return text


def task_section(
    task: str, entry: dict[str, Any], grid_name: str, grid_dir: Path, out_dir: Path, reference: dict[str, Any]
) -> list[str]:
    sources = reference.get("sources", {})
    refs = [r for r in reference.get("reference", []) if r["task"] == task]
    lines = [f"### {task}", ""]
    if entry.get("plot"):
        rel = os.path.relpath(grid_dir / entry["plot"], out_dir)
        lines += [f"![{task}: eval return and cost vs env steps, grid {grid_name}]({rel})", ""]
    ours_steps = entry.get("env_steps", {}).get("max") or entry["budget_env_steps"]
    rows = []
    if entry.get("n_seeds"):
        rows.append(
            [
                f"**this repo, grid `{grid_name}`**",
                "**CVPO**",
                fmt_steps(ours_steps),
                str(entry["n_seeds"]),
                f"deterministic eval, {entry['eval_episodes']}/seed",
                f"{entry['cost_limit']:g}",
                f"**{fmt_ci(entry['eval_return'])}**",
                f"**{fmt_ci(entry['eval_cost'])}**",
                f"feasible {entry['feasible_seeds']}/{entry['n_seeds']} seeds; mean [95 % CI]",
            ]
        )
    for ref in refs:
        src = sources[ref["source"]]
        rows.append(
            [
                src["name"],
                ref["method"],
                fmt_steps(_budget(ref, sources)),
                str(src.get("seeds", "–")),
                src.get("episodes", "–"),
                f"{_cost_limit(ref, sources):g}",
                _ref_value(ref, "return"),
                _ref_value(ref, "cost"),
                ref.get("note", ""),
            ]
        )
    if rows:
        header = ["Source", "Method", "Env steps", "Seeds", "Episodes", "Cost limit", "Return", "Cost", "Notes"]
        lines += [*_table(header, rows), ""]
    lines += [budget_sentence(task, ours_steps, refs, sources), ""]
    return lines


def grid_section(grid_dir: Path, summary: dict[str, Any], out_dir: Path, reference: dict[str, Any]) -> list[str]:
    name = summary["grid"]
    tasks = summary["tasks"]
    grid_file = summary.get("grid_file", {})
    machine = summary.get("machine", {})
    lines = [f"## Grid `{name}`", ""]
    if summary.get("description"):
        lines += [f"{summary['description']}.", ""]
    n_seeds = [t.get("n_seeds", 0) for t in tasks.values()]
    eval_eps = [t["eval_episodes"] for t in tasks.values() if t.get("eval_episodes") is not None]
    caveats = []
    if min(n_seeds, default=0) < MIN_SEEDS:
        caveats.append(f"fewer than {MIN_SEEDS} finished seeds on some task")
    if eval_eps and min(eval_eps) < MIN_EVAL_EPISODES:
        caveats.append(f"fewer than {MIN_EVAL_EPISODES} evaluation episodes per point")
    runs = summary.get("runs", {})
    if runs.get("finished", 0) < runs.get("planned", 0):
        caveats.append(f"only {runs['finished']} of {runs['planned']} runs finished")
    if caveats:
        lines += [
            f"> **Not a performance result:** {'; '.join(caveats)}. These numbers show the pipeline "
            "works; they say nothing about how well CVPO learns.",
            "",
        ]
    confidence = summary.get("confidence", 0.95)
    overrides = json.dumps(grid_file.get("overrides", {}), separators=(", ", ": "), ensure_ascii=False)
    lines += [
        f"- Grid file: `{summary.get('grid_path', '?')}`; "
        f"`.venv/bin/python -m bench.grid {summary.get('grid_path', '?')}` reproduces it.",
        f"- Seeds {grid_file.get('seeds')}, cost limit {grid_file.get('cost_limit')}, "
        f"engine overrides beyond each task's preset: `{overrides}`.",
        f"- One torch thread per run on a {machine.get('cpus', '?')}-CPU {machine.get('processor', '')} host "
        f"(torch {machine.get('torch', '?')}); summary written {summary.get('time', '?')}.",
        f"- Final = {summary.get('final', 'last epoch')}; interval = {confidence * 100:g} % percentile bootstrap "
        f"of the mean over seeds ({summary.get('n_resamples', '?')} resamples, seeded).",
        "",
    ]
    header = [
        "Task",
        "Preset",
        "Seeds",
        "Env steps",
        "Eval return, mean [95 % CI]",
        "Eval cost, mean [95 % CI]",
        "Cost ≤ limit",
        "Wall time / run",
        "Env steps/s / run",
    ]
    rows = []
    for task, t in tasks.items():
        if not t.get("n_seeds"):
            rows.append([task, t.get("preset", ""), "0", "–", "no finished seed yet", "–", "–", "–", "–"])
            continue
        steps = t["env_steps"]
        rows.append(
            [
                task,
                t.get("preset", ""),
                str(t["n_seeds"]),
                fmt_steps(steps["max"]) if steps["min"] == steps["max"] else f"{steps['min']}–{steps['max']}",
                fmt_ci(t["eval_return"]),
                fmt_ci(t["eval_cost"]),
                f"{t['feasible_fraction'] * 100:.0f} % ({t['feasible_seeds']}/{t['n_seeds']})",
                fmt_duration(t["wall_time_s"]["mean"]),
                f"{t['env_steps_per_s']:.0f}",
            ]
        )
    lines += [*_table(header, rows), ""]
    for task, t in tasks.items():
        lines += task_section(task, t, name, grid_dir, out_dir, reference)
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "mean" in value:
        return fmt_ci(value) if "ci_low" in value else fmt_num(value["mean"])
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int | float):
        return fmt_num(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _ci_t(d: dict[str, Any]) -> str:
    """A bench's ``mean_ci`` dict (Student-t interval) as ``mean [low, high]``."""
    if d.get("n", 0) < 2:
        return fmt_num(d["mean"])
    return f"{fmt_num(d['mean'])} [{fmt_num(d['ci95_low'])}, {fmt_num(d['ci95_high'])}]"


def _config_summary(data: dict[str, Any]) -> str:
    """`` (128×128, 1 reward critic(s) and 1 cost critic(s), K 16, …)`` from our row's resolved config in
    the JSON, so the sizes in the report are the ones that ran; empty when no row carries one."""
    ours = [r["config"] for r in data.get("rows", []) if r.get("impl") == "ours" and "network" in r.get("config", {})]
    if not ours:
        return ""
    cfg = ours[0]
    n, a = cfg["network"], cfg["algo"]
    costs = len(cfg.get("constraints", {}).get("cost_limits", [None]))
    return (
        f" ({'×'.join(map(str, n['critic_hidden']))}, {n['reward_critics']} reward critic(s) and {costs} cost "
        f"critic(s), K {a['num_samples']}, batch {a['batch_size']}, {a['updates_per_step']:g} updates per step)"
    )


def throughput_lines(data: dict[str, Any]) -> list[str]:
    """bench/vs_fsrl.py: env-steps/s of stock FSRL, FSRL with our fast resets, and ours, per task."""
    machine = data.get("machine", {})
    header = ["Task", "FSRL stock", "FSRL + our fast resets", "Ours", "Ours ÷ stock", "Ours ÷ fast resets"]
    rows = []
    for task, m in data.get("medians", {}).items():
        med, ratios = m.get("median_env_steps_per_s", {}), m.get("ratios", {})
        rows.append(
            [
                task,
                *(fmt_num(med.get(k)) for k in ("fsrl-stock", "fsrl-fast", "ours")),
                *(f"{ratios[k]:.2f}×" if k in ratios else "–" for k in ("ours_vs_fsrl-stock", "ours_vs_fsrl-fast")),
            ]
        )
    return [
        f"Training throughput (end-to-end env-steps/s, median over seeds and repeats) over a "
        f"{fmt_steps(data.get('window_env_steps', 0))}-step window after one FSRL collect of warm-up, "
        "one training env, "
        f"{machine.get('threads', '?')} torch threads, each row a fresh process, one after another; FSRL's "
        f"safety-gymnasium config on both sides{_config_summary(data)}, no evaluation. "
        f"Written {data.get('time', '?')}.",
        "",
        *_table(header, rows),
        "",
    ]


def learning_lines(data: dict[str, Any]) -> list[str]:
    """bench/vs_fsrl_learning.py: both engines trained for the same budget and seeds, then evaluated."""
    st, summary = data.get("settings", {}), data.get("summary", {})
    names = {"fsrl": "FSRL CVPO (fast-safe-rl 0.1.0, stock)", "ours": "this repo's CVPO"}
    rows = []
    for arm, name in names.items():
        if arm in summary:
            a = summary[arm]
            rows.append(
                [
                    name,
                    str(a["eval_return"]["n"]),
                    fmt_steps(st.get("budget", 0)),
                    _ci_t(a["eval_return"]),
                    _ci_t(a["eval_cost"]),
                    f"{a['feasible_fraction']:.0%}",
                    _ci_t(a["env_steps_per_s"]),
                ]
            )
    ratio = summary.get("ratio_env_steps_per_s")
    return [
        f"Learning side by side on `{st.get('task')}`, cost limit {data.get('cost_limit', 25):g}, "
        f"seeds {data.get('seeds')}, FSRL's config on both sides, {st.get('jobs')} runs at a time with "
        f"{st.get('threads')} torch thread(s) each. Final policy evaluated with deterministic actions, "
        f"{st.get('eval_episodes')} episodes per seed; intervals are 95 % Student-t over seeds; env-steps/s is "
        f"training wall time over the whole budget. Written {data.get('time', '?')}.",
        "",
        *_table(
            [
                "Engine",
                "Seeds",
                "Env steps",
                "Eval return [95 % CI]",
                "Eval cost [95 % CI]",
                "Cost ≤ limit",
                "Env-steps/s",
            ],
            rows,
        ),
        "",
        *([f"Throughput ratio, ours ÷ FSRL: **{ratio:.2f}×**.", ""] if ratio else []),
    ]


def generic_lines(data: dict[str, Any]) -> list[str]:
    """Any other bench's JSON: top-level scalars as a list, every list of row objects as a table."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and not any(isinstance(v, list) for v in value.values()):
            lines.append(f"- {key}: " + ", ".join(f"{k} {_cell(v)}" for k, v in value.items()))
        elif not isinstance(value, list):
            lines.append(f"- {key}: {_cell(value)}")
    lines.append("")
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            columns = list(dict.fromkeys(k for r in value for k in r))
            lines += [f"{key}:", "", *_table(columns, [[_cell(r.get(c)) for c in columns] for r in value]), ""]
    return lines


RENDERERS = {"vs_fsrl": throughput_lines, "vs_fsrl_learning": learning_lines}


def fsrl_section(paths: list[Path]) -> list[str]:
    """The side-by-side with FSRL's CVPO, from whatever vs_fsrl*.json files exist."""
    lines = ["## Side by side with FSRL's CVPO", ""]
    if not paths:
        return [
            *lines,
            "Pending: no `bench/results/vs_fsrl*.json` yet. The FSRL bench (FSRL in its own virtualenv, "
            "reference-results.md §5) writes it; rerun `bench/report.py` and this section fills in.",
            "",
        ]
    for path in paths:
        data = json.loads(path.read_text())
        lines += [f"### `{os.path.relpath(path, ROOT)}`", ""]
        lines += RENDERERS.get(data.get("benchmark", ""), generic_lines)(data)
    return lines


def render(
    summaries: list[tuple[Path, dict[str, Any]]],
    reference: dict[str, Any],
    fsrl: list[Path],
    out: Path,
    ablations: tuple[Path, ...] = (),
) -> str:
    out_dir = out.parent
    inputs = ", ".join(f"`{os.path.relpath(d / 'summary.json', ROOT)}`" for d, _ in summaries)
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/report.py; do not edit by hand. Regenerate: .venv/bin/python -m bench.report -->",
        "",
        f"Generated by `bench/report.py` from {inputs} and `bench/reference_results.toml`; every number "
        "below comes from those files. Grids run with `bench/grid.py` (README, *Benchmark grid*).",
        "",
        "How to read it:",
        "",
        "- **Final** eval return and cost: the last epoch of each seed, deterministic (mean-action) episodes "
        "on fixed evaluation layouts; the interval is a 95 % percentile bootstrap of the mean over seeds "
        "(with few seeds it is narrow and it can never be wider than the seeds' range).",
        "- **Cost ≤ limit**: the fraction of seeds whose final eval cost is within the cost limit.",
        "- **Wall time**: per run, one torch thread each, several runs sharing the host's cores.",
        "- Published numbers: OmniSafe's ± is the std over seeds, not a confidence interval.",
        *(f"- {note}" for note in reference.get("notes", [])),
        "",
        "Published sources (`bench/reference_results.toml`):",
        "",
        *(
            f"- **{src['name']}**: {src['where']}; seeds: {src.get('seeds', 'not stated')}; episodes: "
            f"{src.get('episodes', 'not stated')}; {src.get('spread', '')}."
            for src in reference.get("sources", {}).values()
        ),
        "",
    ]
    by_name = {s.get("grid", d.name): s for d, s in summaries}
    for path in ablations:
        lines += ablation_section(path, by_name)
    for grid_dir, summary in summaries:
        lines += grid_section(grid_dir, summary, out_dir, reference)
    lines += fsrl_section(fsrl)
    return "\n".join(lines).rstrip() + "\n"


def ablation_section(path: Path, summaries: dict[str, dict[str, Any]]) -> list[str]:
    """One comparison table per task over the arms an ablation file names (bench/ablations/*.toml)."""
    try:
        spec = tomllib.loads(path.read_text())
        arms = [(a["grid"], a["label"]) for a in spec["arms"]]
        title, baseline = spec["title"], spec["baseline"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not an ablation file ({exc})") from exc
    present = [(g, label) for g, label in arms if g in summaries]
    lines = [f"## Ablation: {title}", "", f"Arms from `{os.path.relpath(path, ROOT)}`:", ""]
    lines += [f"- `{g}`: {label}" + ("" if g in summaries else " — **not run yet**") for g, label in arms]
    lines += [
        "",
        "Final = last epoch of each seed (deterministic eval episodes on the fixed eval layouts). "
        "Feasible = seeds whose final eval cost ≤ the limit. Sampled-action cost, σ, λ-at-cap share and "
        "critic calibration (predicted Q_c at the start states vs realised discounted cost) are the "
        "trust metrics the engine reports since this issue; the baseline predates them. "
        f"The return bar is the baseline's lower CI bound (`{baseline}`).",
        "",
    ]
    base = summaries.get(baseline, {}).get("tasks", {})
    tasks = list(dict.fromkeys(t for g, _ in present for t in summaries[g].get("tasks", {})))
    for task in tasks:
        bar = (base.get(task, {}).get("eval_return") or {}).get("ci_low")
        lines += [f"### {task}", ""]
        rows = []
        for grid, _ in present:
            t = summaries[grid]["tasks"].get(task)
            if not t or not t.get("n_seeds"):
                rows.append([f"`{grid}`", "0", "–", "–", "–", "–", "–", "–", "–"])
                continue
            tr = t.get("trust", {})
            ret = t["eval_return"]["mean"]
            pred, real = tr.get("critic_cost_predicted"), tr.get("critic_cost_realised")
            rows.append(
                [
                    f"`{grid}`",
                    str(t["n_seeds"]),
                    f"{t['feasible_seeds']}/{t['n_seeds']}",
                    fmt_ci(t["eval_return"]) + ("" if bar is None else (" ✓" if ret >= bar else " ✗")),
                    fmt_ci(t["eval_cost"]),
                    fmt_ci(tr.get("eval_cost_stochastic")),
                    fmt_num(tr["policy_std"]["mean"]) if "policy_std" in tr else "–",
                    fmt_num(tr["lambda_at_cap_share"]["mean"]) if "lambda_at_cap_share" in tr else "–",
                    f"{fmt_num(pred['mean'])} / {fmt_num(real['mean'])}" if pred and real else "–",
                ]
            )
        lines += _table(
            [
                "Arm",
                "Seeds",
                "Feasible",
                f"Eval return [95 % CI] (✓ ≥ {fmt_num(bar)})" if bar is not None else "Eval return [95 % CI]",
                "Eval cost [95 % CI]",
                "Sampled-action eval cost",
                "Policy σ",
                "λ at cap",
                "Critic: predicted / realised",
            ],
            rows,
        )
        lines.append("")
    return lines


def _grid_order(item: tuple[Path, dict[str, Any]]) -> tuple[int, str]:
    """Largest grids (most finished seeds × steps) first: the real result leads, smoke demos follow."""
    _, s = item
    size = sum(t.get("n_seeds", 0) * t.get("budget_env_steps", 0) for t in s.get("tasks", {}).values())
    return (-size, s.get("grid", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="*", type=Path, help="grid result dirs (default: every results/*/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report file (default docs/benchmarks.md)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="published numbers (TOML)")
    parser.add_argument(
        "--fsrl-dir", type=Path, default=ROOT / "bench" / "results", help=f"where {FSRL_GLOB} files are looked for"
    )
    parser.add_argument(
        "--ablations-dir", type=Path, default=ROOT / "bench" / "ablations", help="ablation files (*.toml)"
    )
    args = parser.parse_args(argv)
    try:
        dirs = args.grids or sorted(p.parent for p in (ROOT / "results").glob("*/summary.json"))
        if not dirs:
            raise ReportError("no grid summaries: run bench/grid.py first, or name the result dirs")
        summaries = sorted(load_summaries(dirs), key=_grid_order)
        reference = load_reference(args.reference)
        fsrl = sorted(args.fsrl_dir.glob(FSRL_GLOB))
        out = args.out.resolve()
        ablations = tuple(sorted(args.ablations_dir.glob("*.toml")))
        text = render([(d.resolve(), s) for d, s in summaries], reference, fsrl, out, ablations)
    except ReportError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
