"""ONNX export of a policy artefact, built with ``onnx.helper`` from the safetensors weights (no torch).

The graph is the deterministic policy end to end, so an onboard controller needs nothing else
(service-design.md §2.3, the Isaac Lab exporter's practice): the frozen normaliser is baked in
(designing out SB3's separate ``vec_normalize.pkl``), then the Linear/ReLU trunk, the mean head,
the optional ``mean_bound·tanh``, the clip to [-1, 1] and the affine map onto the action Box, and a
box shield when the policy has one. A hook shield is server-side code and cannot be exported.

Normalisation and the Box map run in float64 inside the graph (a few values per row, so free):
the observation mean can be large relative to its spread, and float32 ``obs - mean`` would cost
more than the 1e-5 agreement with ``PolicyRuntime`` that the tests hold it to. The MLP runs in float32.

Inputs/outputs: ``observations`` float32 [batch, obs_dim] → ``actions`` float32 [batch, act_dim],
``clipped`` bool [batch] (the mean left [-1, 1]), plus ``shield_applied`` bool [batch] for box shields.

``cost_head=True`` (artefacts that carry their cost critics) adds ``cost_to_go`` float32
[batch, m]: the critics' Q_c(s, a) per constraint for the normalised observation and the policy's
raw mean action (after ``mean_bound·tanh``, before the clip), as ``/act`` returns it. The m members
run as one broadcast MatMul per layer over their stacked (m, in, out) weights, in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cvpo.artefact import PolicyRuntime, load_policy

OPSET = 17  # Clip with tensor bounds, ReduceMax with an ``axes`` attribute; onnxruntime ≥ 1.13 runs it
IR_VERSION = 8  # the IR that opset 17 shipped with; any runtime that knows opset 17 reads it


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: Any, dtype: type) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self._n += 1
        name = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{self._n}_{op_type}", **attrs))
        return name

    def any_row(self, flags: str, out: str) -> str:
        """bool (B, d) → bool (B,): ReduceMax over float 0/1 (ReduceMax has no bool kernel)."""
        as_float = self.op("Cast", flags, to=TensorProto.FLOAT)
        return self.op("Cast", self.op("ReduceMax", as_float, axes=[1], keepdims=0), out=out, to=TensorProto.BOOL)


def _box_shield(shield: dict[str, Any] | None, runtime: PolicyRuntime) -> tuple[np.ndarray, np.ndarray] | None:
    if shield is None or shield.get("type") in (None, "none"):
        return None
    if shield.get("type") != "box":
        raise ValueError(
            f"a {shield.get('type')!r} shield runs server-side code and cannot be baked into ONNX; "
            "only box shields export"
        )
    low = np.asarray(shield["low"], dtype=np.float64)
    high = np.asarray(shield["high"], dtype=np.float64)
    if low.shape != (runtime.act_dim,) or high.shape != (runtime.act_dim,):
        raise ValueError(f"box shield bounds must have {runtime.act_dim} entries")
    if not (np.isfinite(low).all() and np.isfinite(high).all() and np.all(low <= high)):
        raise ValueError("box shield bounds must be finite with low ≤ high")
    return low, high


def _cost_head(g: _Graph, runtime: PolicyRuntime, features: str, mean: str) -> None:
    """Q_c(s, a) (B, m) as ``cost_to_go`` from the normalised observation and the raw mean action."""
    assert runtime.cost_critic is not None
    h = g.op("Concat", features, mean, axis=1)  # (B, o + d)
    last = len(runtime.cost_critic) - 1
    for layer, (w, b) in enumerate(runtime.cost_critic):
        # (B, in) @ (m, in, out) broadcasts to (m, B, out); later layers are (m, B, in) @ (m, in, out).
        h = g.op("MatMul", h, g.const(f"cost_critic_{layer}_w", w, np.float32))
        h = g.op("Add", h, g.const(f"cost_critic_{layer}_b", b, np.float32))  # b: (m, 1, out)
        if layer < last:
            h = g.op("Relu", h)
    q = g.op("Squeeze", h, g.const("cost_squeeze_axes", [2], np.int64))  # (m, B)
    g.op("Transpose", q, out="cost_to_go", perm=[1, 0])


def build_model(
    runtime: PolicyRuntime, shield: dict[str, Any] | None = None, cost_head: bool = False
) -> onnx.ModelProto:
    """The ONNX model of a loaded artefact's deterministic policy (see the module docstring).

    ``cost_head``: add the ``cost_to_go`` output; a ``ValueError`` when the artefact has no critics."""
    if cost_head and runtime.cost_critic is None:
        raise ValueError("this policy artefact carries no cost critic, so there is no cost head to export")
    g = _Graph()
    box = _box_shield(shield, runtime)
    x = "observations"
    if runtime.norm_mean is not None:
        z = g.op("Sub", g.op("Cast", x, to=TensorProto.DOUBLE), g.const("norm_mean", runtime.norm_mean, np.float64))
        z = g.op("Div", z, g.const("norm_std", runtime.norm_std, np.float64))
        c = float(runtime.norm_clip)
        z = g.op("Clip", z, g.const("norm_clip_low", -c, np.float64), g.const("norm_clip_high", c, np.float64))
        x = g.op("Cast", z, to=TensorProto.FLOAT)
    features = x  # what the networks see: the critics take it too
    for i, (w, b) in enumerate(runtime.trunk):
        x = g.op("Gemm", x, g.const(f"trunk_{i}_w", w, np.float32), g.const(f"trunk_{i}_b", b, np.float32))
        x = g.op("Relu", x)
    # PolicyRuntime keeps weights as (in, out), so no transB.
    mean = g.op("Gemm", x, g.const("mean_w", runtime.mean_w, np.float32), g.const("mean_b", runtime.mean_b, np.float32))
    if runtime.mean_bound is not None:
        mean = g.op("Mul", g.op("Tanh", mean), g.const("mean_bound", runtime.mean_bound, np.float32))
    if cost_head:
        _cost_head(g, runtime, features, mean)
    one = g.const("one", 1.0, np.float32)
    g.any_row(g.op("Greater", g.op("Abs", mean), one), "clipped")
    unit = g.op("Cast", g.op("Clip", mean, g.const("minus_one", -1.0, np.float32), one), to=TensorProto.DOUBLE)
    # Same arithmetic as cvpo.envs.wrappers.scale_action: low + (a + 1)·0.5·(high − low), clipped to the Box.
    half_range = g.const("half_range", 0.5 * (runtime.high - runtime.low), np.float64)
    low = g.const("act_low", runtime.low, np.float64)
    high = g.const("act_high", runtime.high, np.float64)
    act = g.op("Add", low, g.op("Mul", g.op("Add", unit, g.const("one_d", 1.0, np.float64)), half_range))
    act = g.op("Max", g.op("Min", act, high), low)
    if box is not None:
        safe = g.op("Max", g.op("Min", act, g.const("shield_high", box[1], np.float64)),
                    g.const("shield_low", box[0], np.float64))  # fmt: skip
        g.any_row(g.op("Not", g.op("Equal", safe, act)), "shield_applied")
        act = safe
    g.op("Cast", act, out="actions", to=TensorProto.FLOAT)

    batch = "batch"
    outputs = [
        helper.make_tensor_value_info("actions", TensorProto.FLOAT, [batch, runtime.act_dim]),
        helper.make_tensor_value_info("clipped", TensorProto.BOOL, [batch]),
    ]
    if box is not None:
        outputs.append(helper.make_tensor_value_info("shield_applied", TensorProto.BOOL, [batch]))
    if cost_head:
        m = runtime.critic_members
        outputs.append(helper.make_tensor_value_info("cost_to_go", TensorProto.FLOAT, [batch, m]))
    graph = helper.make_graph(
        g.nodes,
        "cvpo_policy",
        [helper.make_tensor_value_info("observations", TensorProto.FLOAT, [batch, runtime.obs_dim])],
        outputs,
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="cvpo-service",
        doc_string="Deterministic CVPO policy: raw observations in, env actions inside the action Box out.",
    )
    model.ir_version = IR_VERSION
    meta = runtime.meta
    helper.set_model_props(
        model,
        {
            "env_id": str(meta.get("env_id")),
            "weights_sha256": str(meta.get("weights_sha256")),
            "action_low": str(runtime.low.tolist()),
            "action_high": str(runtime.high.tolist()),
            "normalizer": "baked in" if runtime.norm_mean is not None else "none",
            "shield": "box" if box is not None else "none",
            **({"cost_to_go": "Q_c(s, mean action) per constraint, discounted"} if cost_head else {}),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(artefact_dir: Path, shield: dict[str, Any] | None = None, cost_head: bool = False) -> bytes:
    """Serialized ONNX bytes for an artefact directory (its sha256 is checked on load)."""
    return build_model(load_policy(Path(artefact_dir)), shield, cost_head).SerializeToString()
