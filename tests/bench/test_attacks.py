"""bench/results/attacks.json (issue #23 item 5): every attack was run against the live service with a
training job, each met the goal against its own baseline, the job's lease was never lost, and the
summary is what bench/attacks.py computes from the raw figures; the run on the old code shows the
attacks biting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
RESULTS = BENCH / "results"


@pytest.fixture(scope="module")
def attacks_module() -> Any:
    from bench import attacks

    return attacks


def test_every_attack_meets_the_goal_and_the_lease_holds(attacks_module: Any) -> None:
    result = json.loads((RESULTS / "attacks.json").read_text())
    assert result["benchmark"] == "attacks" and result["job"]["env_id"] == "SafetyPointCircle1-v0"
    assert result["settings"]["api_env"]["CVPO_MAX_INFLIGHT"] == "2"
    assert set(result["attacks"]) == set(attacks_module.ATTACKS)
    for name, row in result["attacks"].items():
        assert result["summary"][name] == attacks_module.attack_summary(row), name
        summary = result["summary"][name]
        assert summary["goal_met"] and summary["ratio"] <= 2.0 and summary["attacked_served_share"] >= 0.95, name
        assert row["baseline"]["requests"] >= 500 and row["attacked"]["requests"] >= 500, name
        assert row["attacker"]["connections"] >= 16, name  # the attack ran
    assert result["lease"]["lease_lost"] is False and result["lease"]["attempts_seen"] == [1]
    assert result["lease"]["status_at_end"] == "running" and result["lease"]["min_lease_margin_s"] > 0


def test_the_old_code_failed_the_attacks(attacks_module: Any) -> None:
    before = json.loads((RESULTS / "attacks_before.json").read_text())
    assert before["code"].startswith("e120eff")
    for name, row in before["attacks"].items():
        assert before["summary"][name] == attacks_module.attack_summary(row), name
    assert not any(s["goal_met"] for s in before["summary"].values())
    assert before["summary"]["slow_bodies_no_token"]["attacked_statuses"] == {"503": 1000}


def test_an_event_stream_flood_leaves_act_served(attacks_module: Any) -> None:
    """The extra attack (bench/attacks.py --attacks event_stream_flood): 64 clients following the
    training job's event stream with one valid token."""
    result = json.loads((RESULTS / "attacks_streams.json").read_text())
    row = result["attacks"]["event_stream_flood"]
    assert result["summary"]["event_stream_flood"] == attacks_module.attack_summary(row)
    assert result["summary"]["event_stream_flood"]["goal_met"] and row["attacker"]["connections"] >= 64
    assert result["lease"]["lease_lost"] is False
