"""TrainConfig resolution, validation messages and the saved effective config."""

from __future__ import annotations

import math

import pytest

from cvpo.config import ConfigError, config_from_dict, parse_assignment, preset_for, resolve_config


def test_defaults_preset_and_overrides_resolve_in_order() -> None:
    base = resolve_config({"env_id": "SafetyPointGoal1-v0"})
    assert base.preset == "navigation"
    assert base.algo.gamma == 0.995 and base.algo.n_step == 3  # from the preset, not the defaults
    over = resolve_config({"env_id": "SafetyPointGoal1-v0", "algo": {"gamma": 0.98}})
    assert over.algo.gamma == 0.98 and over.algo.n_step == 3
    none = resolve_config({"env_id": "SafetyPointGoal1-v0"}, preset="none")
    assert none.preset == "" and none.algo.gamma == 0.99
    assert preset_for("SafetyCarCircle2-v0") == "circle"
    assert preset_for("SafetyAntVelocity-v1") == "velocity"


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"algo": {"nope": 1}}, "algo.nope", "unknown setting"),
        ({"algo": {"gamma": 1.5}}, "algo.gamma", "(0, 1)"),
        ({"algo": {"num_samples": 16, "kl_bound": 3.0}}, "algo.kl_bound", "log K"),
        ({"algo": {"batch_size": "big"}}, "algo.batch_size", "integer"),
        ({"constraints": {"cost_limits": [25, -1]}}, "constraints.cost_limits[1]", "≥ 0"),
        ({"constraints": {"cost_limits": [25], "cost_signals": ["a", "b"]}}, "constraints.cost_signals", "one"),
        ({"env_id": "SafetyPointGoal7-v0"}, "env_id", "Valid ids"),
        ({"total_env_steps": 0}, "total_env_steps", "≥ 1"),
        ({"network": {"covariance": "full"}}, "network.covariance", "diag or cholesky"),
        ({"network": {"reward_critics": 3}}, "network.reward_critics", "must be 1 or 2"),
        ({"constraints": {"margin": 1.0}}, "constraints.margin", "[0, 1)"),
        ({"constraints": {"margin": 0.5, "margin_max": 0.4}}, "constraints.margin_max", "[constraints.margin, 1)"),
        ({"constraints": {"margin_control": "pid"}}, "constraints.margin_control", "off or integral"),
        ({"constraints": {"margin_target": 0.0}}, "constraints.margin_target", "(0, 2]"),
        ({"constraints": {"margin_gain": 2.0}}, "constraints.margin_gain", "[0, 1]"),
        ({"constraints": {"probe_every": -1}}, "constraints.probe_every", "≥ 0"),
        ({"constraints": {"cost_continuation": "det"}}, "constraints.cost_continuation", "sampled or mean"),
        ({"loop": {"eval_stochastic_episodes": -1}}, "loop.eval_stochastic_episodes", "[0, 1000]"),
        ({"algo": {"tau": float("nan")}}, "algo.tau", "NaN"),
        ({"loop": {"buffer_size": 10}}, "loop.buffer_size", "batch_size"),
        ({"preset": 3}, "preset", "string"),
        ({"algo": {"actor_lr": 1e308}}, "algo.actor_lr", "(0, 1]"),
        ({"algo": {"critic_lr": 2.0}}, "algo.critic_lr", "(0, 1]"),
    ],
)
def test_bad_values_name_the_field(overrides: dict, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides)
    assert err.value.field == field
    assert fragment in str(err.value)


def test_infinite_limit_and_multiple_constraints() -> None:
    c = resolve_config({"constraints": {"cost_limits": "inf"}})
    assert c.constraints.cost_limits == (math.inf,) and c.num_constraints == 1
    c = resolve_config({"constraints": {"cost_limits": [10, 20], "cost_signals": ["cost", "cost_hazards"]}})
    assert c.num_constraints == 2


def test_effective_config_round_trips_with_the_same_hash() -> None:
    c = resolve_config(
        {
            "env_id": "SafetyHopperVelocity-v1",
            "constraints": {"cost_limits": ["inf"]},
            "network": {"actor_hidden": [64, 64]},
        }
    )
    again = config_from_dict(c.to_dict())
    assert again == c
    assert again.config_hash() == c.config_hash()
    assert resolve_config({"seed": 1}).config_hash() != resolve_config({"seed": 2}).config_hash()


def test_parse_assignment() -> None:
    assert parse_assignment("algo.num_samples=64") == {"algo": {"num_samples": 64}}
    assert parse_assignment("algo.cost_mask=never") == {"algo": {"cost_mask": "never"}}
    assert parse_assignment("constraints.cost_limits=[10, 20]") == {"constraints": {"cost_limits": [10, 20]}}
    with pytest.raises(ConfigError):
        parse_assignment("algo.num_samples")


def test_one_override_builder_for_rest_cli_and_grids() -> None:
    """Layers may mix nested sections, dotted keys and bare names; later layers win key by key."""
    from cvpo.config import build_overrides

    got = build_overrides(
        {"algo": {"batch_size": 64, "tau": 0.02}, "network.actor_hidden": [32]},
        None,
        {"batch_size": 128, "loop": {"eval_episodes": 3}},
        {"algo.tau": 0.05, "seed": 4},
    )
    assert got == {
        "algo": {"batch_size": 128, "tau": 0.05},
        "network": {"actor_hidden": [32]},
        "loop": {"eval_episodes": 3},
        "seed": 4,
    }
    config = resolve_config(got)
    assert (config.algo.batch_size, config.algo.tau, config.seed) == (128, 0.05, 4)


def test_config_errors_carry_a_structured_path() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config({"constraints": {"cost_limits": [25.0, -1.0]}})
    assert info.value.path == ("constraints", "cost_limits", 1)
    assert ConfigError("algo.batch_size", "x").path == ("algo", "batch_size")


def test_a_section_in_one_layer_and_a_value_in_another_is_an_error() -> None:
    from cvpo.config import build_overrides

    with pytest.raises(ConfigError) as info:
        build_overrides({"loop": 5}, {"loop.eval_episodes": 3})
    assert info.value.path == ("loop",)
