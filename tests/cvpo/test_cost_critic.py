"""The cost critics in the policy artefact: numpy Q_c equals the trainer's torch critic, the ONNX cost
head equals numpy, old artefacts without critics still load, certificates record the calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from bench.synthetic import write_random_artefact
from cvpo.artefact import ArtefactError, load_policy
from cvpo.certify import Certificate, certify_policy
from cvpo.config import resolve_config
from cvpo.onnx_export import export_onnx
from cvpo.thresholds import per_step_threshold
from tests.cvpo.test_trainer import TINY


@pytest.fixture(scope="module")
def trained_artefact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny trainer (two constraints, fitted normaliser) whose ``write_policy`` exports the critics."""
    from cvpo.trainer import Trainer

    config = resolve_config({**TINY, "constraints": {"cost_limits": [25.0, 40.0]}})
    trainer = Trainer(config, tmp_path_factory.mktemp("run") / "run", quiet=True)
    rng = np.random.default_rng(0)
    trainer.normalizer.update(rng.normal(2.0, 3.0, size=(500, trainer.env.obs_dim)))
    return trainer, trainer.write_policy("policy", None)


def test_cost_to_go_matches_the_trainers_torch_critic(trained_artefact: tuple[Any, Path]) -> None:
    import torch

    trainer, path = trained_artefact
    policy = load_policy(path)
    assert policy.has_cost_critic and policy.critic_members == 2
    rng = np.random.default_rng(1)
    obs = rng.normal(2.0, 6.0, size=(64, trainer.env.obs_dim))  # some rows beyond the normaliser's clip
    for action in (
        policy.raw_action(obs),  # the mean
        policy.raw_action(obs, deterministic=False, rng=rng),  # raw samples
        rng.normal(0, 2, size=(64, trainer.env.act_dim)),  # outside [-1, 1]: never clipped before Q_c
    ):
        got = policy.cost_to_go(obs, action)
        assert got.shape == (64, 2)
        with torch.no_grad():
            x = torch.as_tensor(trainer.normalizer.normalize(obs), dtype=torch.float32)
            a = torch.as_tensor(action, dtype=torch.float32)
            expected = trainer.learner.cost_critic(x, a).T.numpy().astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # the trainer's own single-state path feeds the critic the same way
        np.testing.assert_allclose(got[3], trainer.predicted_cost(obs[3], action[3]), rtol=0, atol=1e-5)
    assert np.ptp(got) > 1e-3, "an untrained critic must still give distinct values, or the test proves nothing"

    meta = json.loads((path / "policy.json").read_text())["cost_critic"]
    gamma = trainer.config.algo.gamma
    assert meta["members"] == 2 and meta["gamma"] == gamma and meta["horizon"] == trainer.horizon
    assert meta["per_step_thresholds"] == pytest.approx(per_step_threshold([25.0, 40.0], trainer.horizon, gamma))
    assert meta["cost_signals"] == ["cost", "cost"] and meta["cost_continuation"] == "sampled"


def test_an_old_artefact_without_critics_loads_and_acts(tmp_path: Path) -> None:
    path = write_random_artefact(tmp_path / "old")
    meta = json.loads((path / "policy.json").read_text())
    assert "cost_critic" not in meta and meta["format_version"] == 1  # the format written before critics
    policy = load_policy(path)
    assert not policy.has_cost_critic and policy.critic_members == 0
    actions, _ = policy.act(np.zeros((3, policy.obs_dim)))
    assert actions.shape == (3, 2)
    with pytest.raises(ValueError, match="no cost critic"):
        policy.cost_to_go(np.zeros((1, policy.obs_dim)), np.zeros((1, 2)))


def test_critic_tensors_are_checked(tmp_path: Path) -> None:
    path = write_random_artefact(tmp_path / "p", cost_critic=2)
    weights = path / "policy.safetensors"
    meta_path = path / "policy.json"
    meta = json.loads(meta_path.read_text())
    meta["cost_critic"]["members"] = 3  # says more members than the tensors hold
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtefactError, match="malformed cost critic"):
        load_policy(path)
    meta["cost_critic"]["members"] = 2
    meta_path.write_text(json.dumps(meta))
    load_policy(path)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # critic weights sit in the same file, under the same sha256
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="sha256"):
        load_policy(path)


# ------------------------------------------------------------------------------------------ ONNX

ONNX_CASES: dict[str, dict[str, Any]] = {
    "normalised_two_constraints": {"obs_dim": 7, "act_dim": 3, "cost_critic": 2, "act_low": [-0.5, -2, 0]},
    "raw_tanh_three_constraints": {
        "obs_dim": 5,
        "act_dim": 2,
        "cost_critic": 3,
        "normalizer": False,
        "mean_bound": 1.5,
        "critic_hidden": (8,),
    },
    "point_goal_shapes": {"obs_dim": 60, "act_dim": 2, "hidden": (64, 64), "cost_critic": 1, "critic_hidden": (64, 64)},
}


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_cost_head_matches_numpy(tmp_path: Path, case: str) -> None:
    path = write_random_artefact(tmp_path / case, seed=5, **ONNX_CASES[case])
    policy = load_policy(path)
    sess = _session(export_onnx(path, cost_head=True))
    assert [o.name for o in sess.get_outputs()] == ["actions", "clipped", "cost_to_go"]
    rng = np.random.default_rng(2)
    centre = policy.norm_mean if policy.norm_mean is not None else np.zeros(policy.obs_dim)
    spread = policy.norm_std if policy.norm_std is not None else np.ones(policy.obs_dim)
    for scale in (0.5, 2.0, 50.0):
        obs = (centre + spread * rng.normal(0, scale, (129, policy.obs_dim))).astype(np.float32).astype(np.float64)
        actions, q = sess.run(["actions", "cost_to_go"], {"observations": obs.astype(np.float32)})
        expected = policy.cost_to_go(obs, policy.raw_action(obs))
        assert q.dtype == np.float32 and q.shape == expected.shape == (129, policy.critic_members)
        np.testing.assert_allclose(q, expected, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(actions, policy.act(obs)[0], rtol=0, atol=1e-5)
    # Without the flag the export is the one it always was.
    plain = _session(export_onnx(path))
    assert [o.name for o in plain.get_outputs()] == ["actions", "clipped"]


def test_onnx_cost_head_needs_a_critic_and_keeps_the_box_shield(tmp_path: Path) -> None:
    old = write_random_artefact(tmp_path / "old")
    with pytest.raises(ValueError, match="no cost critic"):
        export_onnx(old, cost_head=True)
    path = write_random_artefact(tmp_path / "new", cost_critic=1)
    shield = {"type": "box", "low": [-0.5, -0.5], "high": [0.5, 0.5]}
    sess = _session(export_onnx(path, shield, cost_head=True))
    assert [o.name for o in sess.get_outputs()] == ["actions", "clipped", "shield_applied", "cost_to_go"]


# ---------------------------------------------------------------------------------- certification


def test_certificate_records_the_critic_calibration(tmp_path: Path) -> None:
    from cvpo import envs

    path = write_random_artefact(
        tmp_path / "policy",
        obs_dim=28,
        act_dim=2,
        hidden=(8,),
        env_id="SafetyPointCircle1-v0",
        head_scale=0.0,
        normalizer=False,
        seed=1,
        cost_critic=1,
    )
    policy = load_policy(path)
    cert = certify_policy(path, episodes=2, stochastic_episodes=1, cost_limits=[400.0])
    cal = cert.critic_calibration
    assert cal is not None and cal["episodes"] == 2 and cal["gamma"] == policy.meta["cost_critic"]["gamma"]
    assert cal["cost_continuation"] == "sampled" and len(cal["constraints"]) == 1
    # predicted: Q_c at each episode's start state and first (mean) action
    with envs.make("SafetyPointCircle1-v0") as env:
        for i, seed in enumerate(range(cert.seeds["base"], cert.seeds["base"] + 2)):
            obs, _ = env.reset(seed=seed)
            q = policy.cost_to_go(obs, policy.raw_action(obs))[0]
            assert cal["predicted"][i] == pytest.approx(q.tolist(), abs=1e-12)
    # realised: discounted, so at most the episode's cost, and > 0 for this costly policy
    for realised, cost in zip(cal["realised"], cert.costs, strict=True):
        assert 0 < realised[0] <= cost[0]
    c = cal["constraints"][0]
    assert c["predicted_mean"] == pytest.approx(np.mean(cal["predicted"]))
    assert c["realised_mean"] == pytest.approx(np.mean(cal["realised"]))
    assert c["bias"] == pytest.approx(c["predicted_mean"] - c["realised_mean"])
    assert Certificate.from_dict(json.loads(json.dumps(cert.to_dict()))) == cert

    without = write_random_artefact(
        tmp_path / "old",
        obs_dim=28,
        hidden=(8,),
        env_id="SafetyPointCircle1-v0",
        head_scale=0.0,
        normalizer=False,
        seed=1,
    )
    old = certify_policy(without, episodes=2, stochastic_episodes=0, cost_limits=[400.0])
    assert old.critic_calibration is None and old.costs == cert.costs  # same actor seed, same layouts
    legacy = cert.to_dict()
    legacy.pop("critic_calibration")  # certificates stored before the field existed still read back
    assert Certificate.from_dict(legacy).critic_calibration is None
