"""The job resource's ``latest`` block carries the validated-selection numbers (loop.select)."""

from __future__ import annotations

from core.store import latest_view


def test_latest_view_names_the_validated_choice_and_the_served_numbers() -> None:
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
    view = latest_view(metrics)
    assert (view["validation_reward"], view["validation_cost"], view["validation_cost_bound"]) == (28.5, 6.0, 14.2)
    assert (view["selected_epoch"], view["served_epoch"]) == (2, 2)
    assert (view["served_eval_reward"], view["served_eval_cost"]) == (27.0, 9.5)
    plain = latest_view({"epoch": 0, "eval_return": 1.0})
    assert plain["selected_epoch"] is None and plain["served_eval_reward"] is None
