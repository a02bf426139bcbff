"""cvpo/metrics.py: the one summary view of an epoch's metrics, which the job resource's ``latest``,
its ``metrics`` events and the grid's runs.jsonl rows all carry."""

from __future__ import annotations

from cvpo.metrics import POLICY_KEYS, policy_summary, summary


def test_summary_names_the_validated_choice_and_the_served_numbers() -> None:
    metrics = {
        "epoch": 4,
        "eval_return": 30.0,
        "eval_cost": 12.0,
        "validation_return": 28.5,
        "validation_cost": 6.0,
        "validation_cost_bound": 14.2,
        "selected": {"epoch": 2, "return": 29.0},
        "served_epoch": 2,
        "served_eval_return": 27.0,
        "served_eval_cost": 9.5,
    }
    view = summary(metrics)
    assert (view["validation_return"], view["validation_cost"], view["validation_cost_bound"]) == (28.5, 6.0, 14.2)
    assert (view["selected_epoch"], view["served_epoch"]) == (2, 2)
    assert (view["served_eval_return"], view["served_eval_cost"]) == (27.0, 9.5)
    plain = summary({"epoch": 0, "eval_return": 1.0})
    assert plain["selected_epoch"] is None and plain["served_eval_return"] is None


def test_summary_takes_the_first_constraint_and_the_epoch_mean_multiplier() -> None:
    metrics = {
        "cost_limits": [25.0, 10.0],
        "cost_multipliers": [1e5, 1e-6],
        "cost_multiplier_0": 4.2e4,
        "cost_multiplier_1": 3.0,
        "train_return": 5.0,
        "lambda_at_cap_0": 0.4,
        "temperature_last": 0.7,
    }
    view = summary(metrics)
    assert view["cost_limit"] == 25.0 and view["cost_limits"] == [25.0, 10.0]
    assert view["lagrange_multiplier"] == 1e5 and view["lagrange_multipliers"] == [1e5, 1e-6]
    assert view["lagrange_multiplier_mean"] == 4.2e4 and view["lagrange_multipliers_mean"] == [4.2e4, 3.0]
    assert view["train_return"] == 5.0 and view["lambda_at_cap_share"] == 0.4 and view["temperature"] == 0.7
    assert summary({})["cost_limits"] == [] and summary({})["lagrange_multiplier"] is None


def test_return_not_reward_in_every_name() -> None:
    """The vocabulary's decision: an episode sum is a return, in every key of the view."""
    view = summary({"epoch": 0})
    assert not [k for k in view if "reward" in k]
    assert {"train_return", "eval_return", "served_eval_return", "validation_return"} <= set(view)
    assert not [k for k in POLICY_KEYS if "reward" in k]
    assert policy_summary({"eval_return": 3.0, "other": 1})["eval_return"] == 3.0
    assert policy_summary(None) == {}
