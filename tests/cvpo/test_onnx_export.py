"""The ONNX export is the numpy runtime's deterministic policy: same actions within 1e-5, same clip flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bench.synthetic import write_random_artefact
from cvpo.artefact import ArtefactError, PolicyRuntime, load_policy
from cvpo.onnx_export import IR_VERSION, OPSET, export_onnx

CASES: dict[str, dict[str, Any]] = {
    "normalised_asymmetric_box": {
        "obs_dim": 7,
        "act_dim": 3,
        "act_low": [-0.5, -2.0, 0.0],
        "act_high": [1.5, 0.25, 4.0],
    },
    "no_normaliser": {"obs_dim": 5, "act_dim": 2, "normalizer": False, "act_low": [-3.0, 0.1], "act_high": [-1.0, 0.2]},
    "tanh_mean_cholesky": {"obs_dim": 4, "act_dim": 3, "mean_bound": 1.5, "covariance": "cholesky", "hidden": (8,)},
    "point_goal_shapes": {"obs_dim": 60, "act_dim": 2, "hidden": (64, 64)},
}


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PolicyRuntime, ort.InferenceSession]]:
    out = {}
    for i, (name, kw) in enumerate(CASES.items()):
        path = write_random_artefact(tmp_path_factory.mktemp(name) / "policy", seed=i, **kw)
        out[name] = (path, load_policy(path), _session(export_onnx(path)))
    return out


def _observations(runtime: PolicyRuntime, n: int, seed: int, scale: float) -> np.ndarray:
    """float32-representable observations (the graph's input type), around and far beyond the normaliser's range."""
    rng = np.random.default_rng(seed)
    centre = runtime.norm_mean if runtime.norm_mean is not None else np.zeros(runtime.obs_dim)
    spread = runtime.norm_std if runtime.norm_std is not None else np.ones(runtime.obs_dim)
    x = centre + spread * rng.normal(0, scale, size=(n, runtime.obs_dim))
    return x.astype(np.float32).astype(np.float64)


def _assert_matches(runtime: PolicyRuntime, sess: ort.InferenceSession, obs: np.ndarray) -> None:
    actions, clipped = sess.run(["actions", "clipped"], {"observations": obs.astype(np.float32)})
    expected, expected_clipped = runtime.act(obs, deterministic=True)
    assert actions.dtype == np.float32 and actions.shape == expected.shape
    np.testing.assert_allclose(actions, expected, rtol=0, atol=1e-5)
    assert np.all(actions >= runtime.low.astype(np.float32)) and np.all(actions <= runtime.high.astype(np.float32))
    # Flags agree except where the mean sits within float32 noise of ±1.
    raw = runtime.raw_action(obs)
    decided = np.all(np.abs(np.abs(raw) - 1.0) > 1e-5, axis=1)
    assert clipped.dtype == np.bool_ and clipped[decided].tolist() == expected_clipped[decided].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_matches_numpy_runtime_in_and_far_outside_the_normaliser_range(exported: Any, case: str) -> None:
    _, runtime, sess = exported[case]
    scale = 1.0 if runtime.norm_mean is None else 1000.0  # un-normalised nets see raw magnitudes
    for seed, s in enumerate((0.5, 2.0, scale)):
        _assert_matches(runtime, sess, _observations(runtime, 257, seed, s))
    flags = runtime.act(_observations(runtime, 257, 9, 2.0))[1]
    assert 0 < flags.sum() < len(flags), "the fixture must exercise both clipped and unclipped rows"


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_onnx_matches_numpy_runtime_on_any_batch(exported: Any, data: st.DataObject) -> None:
    _, runtime, sess = exported["normalised_asymmetric_box"]
    b = data.draw(st.integers(1, 16))
    obs = data.draw(
        arrays(np.float32, (b, runtime.obs_dim), elements=st.floats(-1e6, 1e6, allow_nan=False, width=32))
    ).astype(np.float64)
    _assert_matches(runtime, sess, obs)


def test_model_is_valid_with_explicit_opset_and_dynamic_batch(exported: Any) -> None:
    path, runtime, _ = exported["point_goal_shapes"]
    model = onnx.load_from_string(export_onnx(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION and [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["weights_sha256"] == runtime.meta["weights_sha256"] and props["normalizer"] == "baked in"
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 60]
    assert [o.name for o in model.graph.output] == ["actions", "clipped"]
    assert export_onnx(path) == export_onnx(path), "the export is deterministic"


def test_box_shield_is_baked_in(exported: Any) -> None:
    path, runtime, _ = exported["normalised_asymmetric_box"]
    shield = {"type": "box", "low": [-0.5, -2.0, 0.0], "high": [1.0, 0.25, 4.0]}
    sess = _session(export_onnx(path, shield))
    obs = _observations(runtime, 128, 5, 3.0)
    actions, applied = sess.run(["actions", "shield_applied"], {"observations": obs.astype(np.float32)})
    nominal = runtime.act(obs)[0]
    expected = np.clip(nominal, shield["low"], shield["high"])
    np.testing.assert_allclose(actions, expected, atol=1e-5)
    assert applied.tolist() == np.any(expected != nominal, axis=1).tolist()
    assert 0 < applied.sum() < len(applied)


def test_hook_shields_and_bad_boxes_refuse_to_export(exported: Any) -> None:
    path = exported["no_normaliser"][0]
    with pytest.raises(ValueError, match="cannot be baked into ONNX"):
        export_onnx(path, {"type": "hook", "name": "slow"})
    with pytest.raises(ValueError, match="2 entries"):
        export_onnx(path, {"type": "box", "low": [0.0], "high": [1.0]})
    with pytest.raises(ValueError, match="low ≤ high"):
        export_onnx(path, {"type": "box", "low": [0.0, 1.0], "high": [1.0, 0.0]})


def test_tampered_artefact_is_not_exported(tmp_path: Path) -> None:
    path = write_random_artefact(tmp_path / "policy")
    weights = path / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="sha256"):
        export_onnx(path)


def test_exporter_does_not_import_torch(exported: Any) -> None:
    path = exported["no_normaliser"][0]
    code = (
        "import sys; from cvpo.onnx_export import export_onnx; export_onnx(sys.argv[1]); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
