"""ReplayBuffer and n-step targets (cvpo-algorithm.md §4.2/§4.3, invariant I15)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cvpo.buffer import NStepBatch, ReplayBuffer

GAMMA = 0.5
N = 3

# Hand-built toy buffer, capacity 12, written slots 0..8 (write head at 9), m = 2 constraints.
#   episode A: slots 0-2, slot 2 TERMINATES
#   episode B: slots 3-4, slot 4 is TRUNCATED (next_obs = true final obs 104; reset obs at slot 5 is 5)
#   episode C: slots 5-8, still running (the window is cut at the write head)
# obs[i] = i and next_obs[i] = 100 + i so bootstrap_obs shows which slot's next_obs was used.
TOY_REWARD = [1.0, 2.0, 4.0, 8.0, 16.0, -2.0, 6.0, 10.0, 3.0]
TOY_COST0 = [1.0] * 9
TOY_COST1 = [2.0, 0.0, 4.0, 0.0, 2.0, 6.0, 0.0, 2.0, 8.0]
TOY_TERMINATED = [False, False, True, False, False, False, False, False, False]
TOY_TRUNCATED = [False, False, False, False, True, False, False, False, False]

# Expected with γ = 0.5, n = 3, worked out by hand, e.g.
#   t=0: R = 1 + .5·2 + .25·4 = 3;  C1 = 2 + 0 + .25·4 = 3;  window ends on the termination at 2
#   t=3: R = 8 + .5·16 = 16;        n' = 2, stops at the truncation at 4, bootstraps from 104
#   t=6: R = 6 + .5·10 + .25·3 = 11.75;  C1 = 0 + .5·2 + .25·8 = 3
#   t=7: R = 10 + .5·3 = 11.5;      n' = 2, cut at the write head (slot 9 is not data)
# columns: reward_return, cost0, cost1, discount, bootstrap_obs, terminated, n'
TOY_EXPECTED = [
    (3.0, 1.75, 3.0, 0.125, 102.0, True, 3),
    (4.0, 1.5, 2.0, 0.25, 102.0, True, 2),
    (4.0, 1.0, 4.0, 0.5, 102.0, True, 1),
    (16.0, 1.5, 1.0, 0.25, 104.0, False, 2),
    (16.0, 1.0, 2.0, 0.5, 104.0, False, 1),
    (3.5, 1.75, 6.5, 0.125, 107.0, False, 3),
    (11.75, 1.75, 3.0, 0.125, 108.0, False, 3),
    (11.5, 1.5, 6.0, 0.25, 108.0, False, 2),
    (3.0, 1.0, 8.0, 0.5, 108.0, False, 1),
]


def toy_buffer() -> ReplayBuffer:
    buf = ReplayBuffer(capacity=12, obs_dim=1, act_dim=1, n_costs=2)
    for i in range(9):
        buf.add(
            obs=[float(i)],
            action=[float(-i)],
            reward=TOY_REWARD[i],
            cost=[TOY_COST0[i], TOY_COST1[i]],
            next_obs=[100.0 + i],
            terminated=TOY_TERMINATED[i],
            truncated=TOY_TRUNCATED[i],
        )
    return buf


def random_stream(rng: np.random.Generator, n: int, obs_dim: int = 3, act_dim: int = 2, m: int = 2):
    """n random transitions; about one in five ends an episode."""
    end = rng.random(n) < 0.2
    term = end & (rng.random(n) < 0.5)
    return dict(
        obs=rng.normal(size=(n, obs_dim)).astype(np.float32),
        action=(3 * rng.normal(size=(n, act_dim))).astype(np.float32),
        reward=rng.normal(size=n).astype(np.float32),
        cost=rng.random((n, m)).astype(np.float32),
        next_obs=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminated=term,
        truncated=end & ~term,
    )


def reference_nstep(chrono: list[dict], j: int, n: int, gamma: float):
    """Slow, obviously-correct n-step over a chronological list of the stored transitions."""
    R, C, k = 0.0, np.zeros_like(chrono[j]["cost"], dtype=np.float64), 0
    while True:
        tr = chrono[j + k]
        R += gamma**k * float(tr["reward"])
        C += gamma**k * tr["cost"].astype(np.float64)
        k += 1
        if tr["terminated"] or tr["truncated"] or k == n or j + k == len(chrono):
            return R, C, tr["next_obs"], gamma**k, bool(tr["terminated"]), k


def assert_batches_identical(a: NStepBatch, b: NStepBatch) -> None:
    for field in ("obs", "action", "reward_return", "cost_return", "bootstrap_obs", "discount", "terminated"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), field
    np.testing.assert_array_equal(a.n_steps, b.n_steps)


# --------------------------------------------------------------------------- I15: hand-computed targets


def test_toy_nstep_matches_hand_computed_values():
    buf = toy_buffer()
    out = buf.nstep(np.arange(9), n=N, gamma=GAMMA)
    exp = np.array([row[:5] for row in TOY_EXPECTED])
    np.testing.assert_array_equal(out.reward_return, exp[:, 0])
    np.testing.assert_array_equal(out.cost_return, exp[:, 1:3])
    np.testing.assert_array_equal(out.discount, exp[:, 3])
    np.testing.assert_array_equal(out.bootstrap_obs[:, 0], exp[:, 4])
    np.testing.assert_array_equal(out.terminated, [row[5] for row in TOY_EXPECTED])
    np.testing.assert_array_equal(out.n_steps, [row[6] for row in TOY_EXPECTED])
    np.testing.assert_array_equal(out.obs[:, 0], np.arange(9))
    np.testing.assert_array_equal(out.action[:, 0], -np.arange(9))
    assert out.reward_return.dtype == np.float32 and out.terminated.dtype == np.bool_
    assert out.cost_return.shape == (9, 2) and out.bootstrap_obs.shape == (9, 1)


def test_toy_targets_mask_termination_and_bootstrap_truncation():
    """How the critic uses the batch: with Q̄(s) = s the targets show where bootstrapping happens."""
    out = toy_buffer().nstep(np.array([0, 3, 5]), n=N, gamma=GAMMA)
    q = out.bootstrap_obs[:, 0]
    y_r = out.reward_return + out.discount * (1.0 - out.terminated) * q
    # t=0 ends in a termination: no bootstrap. t=3 ends in a truncation: bootstraps from the true
    # final obs 104, not the reset obs 5. t=5: a full 3-step window bootstraps from next_obs[7].
    np.testing.assert_array_equal(y_r, [3.0, 16.0 + 0.25 * 104.0, 3.5 + 0.125 * 107.0])
    # Cost mask "never" (original code, §4.1): bootstraps even after the termination.
    y_c_never = out.cost_return[:, 1] + out.discount * q
    np.testing.assert_array_equal(y_c_never, [3.0 + 0.125 * 102.0, 1.0 + 0.25 * 104.0, 6.5 + 0.125 * 107.0])


def test_index_order_and_duplicates_do_not_matter():
    buf = toy_buffer()
    idx = np.array([7, 0, 7, 3])
    out = buf.nstep(idx, n=N, gamma=GAMMA)
    exp = [TOY_EXPECTED[i] for i in idx]
    np.testing.assert_array_equal(out.reward_return, [e[0] for e in exp])
    np.testing.assert_array_equal(out.bootstrap_obs[:, 0], [e[4] for e in exp])


def test_n1_equals_one_step_everywhere():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(capacity=50, obs_dim=3, act_dim=2, n_costs=2)
    buf.add_batch(**random_stream(rng, 137))  # wrapped, ptr mid-array
    idx = np.arange(50)
    out = buf.nstep(idx, n=1, gamma=0.9)
    np.testing.assert_array_equal(out.reward_return, buf.reward[idx])
    np.testing.assert_array_equal(out.cost_return, buf.cost[idx])
    np.testing.assert_array_equal(out.bootstrap_obs, buf.next_obs[idx])
    np.testing.assert_array_equal(out.terminated, buf.terminated[idx])
    np.testing.assert_array_equal(out.discount, np.full(50, 0.9, dtype=np.float32))
    np.testing.assert_array_equal(out.n_steps, np.ones(50))


def test_matches_slow_reference_through_several_wraps():
    rng = np.random.default_rng(1)
    cap, n, gamma = 23, 4, 0.8
    buf = ReplayBuffer(capacity=cap, obs_dim=3, act_dim=2, n_costs=2)
    history: list[dict] = []
    for chunk in (5, 1, 17, 30, 2, 11, 40):
        data = random_stream(rng, chunk)
        if chunk == 1:
            buf.add(**{k: v[0] for k, v in data.items()})
        else:
            buf.add_batch(**data)
        history += [{k: v[i] for k, v in data.items()} for i in range(chunk)]
        chrono = history[-cap:]  # what should be stored, oldest first
        assert len(buf) == len(chrono)
        slots = (buf.ptr - len(chrono) + np.arange(len(chrono))) % cap  # slot of chrono[j]
        out = buf.nstep(slots, n=n, gamma=gamma)
        for j in range(len(chrono)):
            R, C, boot, disc, term, k = reference_nstep(chrono, j, n, gamma)
            assert out.reward_return[j] == pytest.approx(R, rel=1e-6, abs=1e-6)
            np.testing.assert_allclose(out.cost_return[j], C, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(out.bootstrap_obs[j], boot)
            assert out.discount[j] == pytest.approx(disc, rel=1e-7)
            assert out.terminated[j] == term and out.n_steps[j] == k
            np.testing.assert_array_equal(out.obs[j], chrono[j]["obs"])


# --------------------------------------------------------------------------- circular storage


def test_circular_overwrite_and_write_head_cut():
    # capacity 5, transitions t=0..7 with reward t+1 and no episode ends: slots hold [t5 t6 t7 t3 t4],
    # ptr = 3. Windows: slot3 (t3,t4,t5) wraps the array end; slot1 (t6,t7) stops at the head and
    # must not read slot 3, which holds the older t3.
    buf = ReplayBuffer(capacity=5, obs_dim=1, act_dim=1, n_costs=1)
    for t in range(8):
        buf.add([t], [0.0], t + 1.0, 0.0, [100.0 + t], False, False)
    assert (buf.ptr, buf.size, len(buf)) == (3, 5, 5)
    np.testing.assert_array_equal(buf.obs[:, 0], [5, 6, 7, 3, 4])
    out = buf.nstep(np.array([3, 4, 0, 1, 2]), n=3, gamma=0.5)
    np.testing.assert_array_equal(out.reward_return, [8.0, 9.75, 11.5, 11.0, 8.0])
    np.testing.assert_array_equal(out.n_steps, [3, 3, 3, 2, 1])
    np.testing.assert_array_equal(out.bootstrap_obs[:, 0], [105.0, 106.0, 107.0, 107.0, 107.0])
    np.testing.assert_array_equal(out.discount, [0.125, 0.125, 0.125, 0.25, 0.5])


def test_sampling_hits_only_stored_transitions():
    rng = np.random.default_rng(2)
    buf = ReplayBuffer(capacity=10, obs_dim=1, act_dim=1, n_costs=1)
    with pytest.raises(ValueError, match="empty"):
        buf.sample_indices(4, rng)
    for t in range(4):
        buf.add([t], [0.0], 1.0, 0.0, [t], False, False)
    idx = buf.sample_indices(2000, rng)
    assert idx.dtype == np.int64 and set(idx.tolist()) == {0, 1, 2, 3}
    # The newest transition's window is cut at the write head: the zero slot 4 is never read.
    assert buf.nstep(np.array([3]), n=3, gamma=0.9).n_steps.tolist() == [1]
    with pytest.raises(ValueError, match="stored transitions"):
        buf.nstep(np.array([4]), n=3, gamma=0.9)
    for t in range(4, 25):
        buf.add([t], [0.0], 1.0, 0.0, [t], False, False)
    idx = buf.sample_indices(2000, rng)
    assert set(idx.tolist()) == set(range(10))
    assert set(buf.obs[idx, 0].tolist()) == set(range(15, 25))  # only the 10 newest survive


def test_add_batch_equals_sequential_add_including_overflow():
    rng = np.random.default_rng(3)
    for first, second in ((3, 4), (6, 19), (0, 8)):  # 19 > capacity: only the last 7 survive
        a = ReplayBuffer(capacity=7, obs_dim=3, act_dim=2, n_costs=2)
        b = ReplayBuffer(capacity=7, obs_dim=3, act_dim=2, n_costs=2)
        for size in (first, second):
            data = random_stream(rng, size)
            a.add_batch(**data)
            for i in range(size):
                b.add(**{k: v[i] for k, v in data.items()})
        assert (a.ptr, a.size) == (b.ptr, b.size)
        for name in ("obs", "next_obs", "action", "reward", "cost", "terminated", "truncated", "episode_end"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --------------------------------------------------------------------------- costs and actions


def test_multi_constraint_costs_are_handled_per_column():
    rng = np.random.default_rng(4)
    data = random_stream(rng, 40, m=2)
    both = ReplayBuffer(capacity=30, obs_dim=3, act_dim=2, n_costs=2)
    both.add_batch(**data)
    idx = np.arange(30)
    out = both.nstep(idx, n=3, gamma=0.7)
    for j in range(2):
        single = ReplayBuffer(capacity=30, obs_dim=3, act_dim=2, n_costs=1)
        single.add_batch(**{**data, "cost": data["cost"][:, j]})
        np.testing.assert_array_equal(out.cost_return[:, j], single.nstep(idx, n=3, gamma=0.7).cost_return[:, 0])
    assert not np.array_equal(out.cost_return[:, 0], out.cost_return[:, 1])


def test_cost_shapes_are_checked():
    one = ReplayBuffer(capacity=4, obs_dim=2, act_dim=1, n_costs=1)
    one.add([0.0, 0.0], [0.0], 0.0, 0.75, [0.0, 0.0], False, False)  # scalar cost when m == 1
    assert one.cost[0, 0] == 0.75
    two = ReplayBuffer(capacity=4, obs_dim=2, act_dim=1, n_costs=2)
    with pytest.raises(ValueError, match="cost"):
        two.add([0.0, 0.0], [0.0], 0.0, 0.75, [0.0, 0.0], False, False)  # ambiguous: not broadcast
    with pytest.raises(ValueError, match="obs"):
        two.add([0.0], [0.0], 0.0, [0.0, 0.0], [0.0, 0.0], False, False)
    with pytest.raises(ValueError, match="terminated"):
        two.add([0.0, 0.0], [0.0], 0.0, [0.0, 0.0], [0.0, 0.0], 1.0, False)
    assert len(two) == 0


def test_actions_are_stored_raw():
    buf = ReplayBuffer(capacity=4, obs_dim=1, act_dim=3, n_costs=1)
    raw = np.array([-3.5, 1.25, 7.0], dtype=np.float32)  # outside the [-1, 1] env box
    buf.add([0.0], raw, 0.0, 0.0, [0.0], False, False)
    buf.add_batch(
        np.zeros((1, 1)),
        raw[None] * 2,
        np.zeros(1),
        np.zeros(1),
        np.zeros((1, 1)),
        np.array([False]),
        np.array([False]),
    )
    np.testing.assert_array_equal(buf.action[:2], [raw, 2 * raw])
    np.testing.assert_array_equal(buf.nstep(np.array([0, 1]), n=1, gamma=0.9).action, [raw, 2 * raw])


# --------------------------------------------------------------------------- checkpoint state


def _savez_roundtrip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    f = io.BytesIO()
    np.savez(f, **state)
    f.seek(0)
    with np.load(f, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _safetensors_roundtrip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load, save

    return load(save(state))


@pytest.mark.parametrize("roundtrip", [_savez_roundtrip, _safetensors_roundtrip])
@pytest.mark.parametrize("n_added", [13, 61])  # partly filled; wrapped with ptr mid-array
def test_state_dict_roundtrip_is_exact(roundtrip, n_added):
    rng = np.random.default_rng(5)
    buf = ReplayBuffer(capacity=20, obs_dim=3, act_dim=2, n_costs=2)
    buf.add_batch(**random_stream(rng, n_added))
    state = buf.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    assert len(state["obs"]) == min(n_added, 20)  # only the filled part is saved

    restored = ReplayBuffer(capacity=20, obs_dim=3, act_dim=2, n_costs=2)
    restored.add_batch(**random_stream(rng, 19))  # stale data beyond the saved size must be cleared
    restored.load_state_dict(roundtrip(state))
    assert (restored.ptr, restored.size) == (buf.ptr, buf.size)
    for name in ("obs", "next_obs", "action", "reward", "cost", "terminated", "truncated", "episode_end"):
        x, y = getattr(buf, name), getattr(restored, name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name

    # Identical futures: same sampling and targets, also after more (wrapping) writes.
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(3):
        i1, i2 = buf.sample_indices(64, r1), restored.sample_indices(64, r2)
        np.testing.assert_array_equal(i1, i2)
        assert_batches_identical(buf.nstep(i1, n=3, gamma=0.99), restored.nstep(i2, n=3, gamma=0.99))
        more = random_stream(rng, 9)
        buf.add_batch(**more)
        restored.add_batch(**more)


def test_state_dict_is_a_snapshot():
    buf = toy_buffer()
    state = buf.state_dict()
    before = state["reward"].copy()
    buf.add([0.0], [0.0], 123.0, [0.0, 0.0], [0.0], False, False)
    buf.reward[0] = -1.0
    np.testing.assert_array_equal(state["reward"], before)
    assert int(state["ptr"]) == 9 and int(state["size"]) == 9 and int(state["capacity"]) == 12


def _mutated(state: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    out = dict(state)
    for k, v in changes.items():
        if v is None:
            del out[k]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"obs": np.zeros((9, 2), np.float32)}, "'obs' has shape"),
        ({"cost": np.zeros((9, 1), np.float32)}, "'cost' has shape"),
        ({"reward": np.zeros(8, np.float32)}, "'reward' has shape"),
        ({"action": np.zeros((9, 1), np.float64)}, "'action' has dtype"),
        ({"terminated": np.zeros(9, np.uint8)}, "'terminated' has dtype"),
        ({"capacity": np.array(13)}, "capacity 13"),
        ({"ptr": np.array(4)}, "ptr 4 inconsistent"),
        ({"size": np.array([2, 3])}, "'size' must be a single integer"),
        ({"truncated": None}, "missing keys \\['truncated'\\]"),
        ({"extra": np.zeros(1)}, "unknown keys \\['extra'\\]"),
    ],
)
def test_load_state_dict_rejects_mismatches(changes, message):
    state = toy_buffer().state_dict()
    target = ReplayBuffer(capacity=12, obs_dim=1, act_dim=1, n_costs=2)
    target.add([5.0], [5.0], 5.0, [5.0, 5.0], [5.0], False, False)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(_mutated(state, **changes))
    # A failed load leaves the buffer as it was.
    assert (target.ptr, target.size) == (1, 1) and target.obs[0, 0] == 5.0


def test_load_state_dict_rejects_other_buffer_geometry():
    state = toy_buffer().state_dict()
    with pytest.raises(ValueError, match="'obs' has shape"):
        ReplayBuffer(capacity=12, obs_dim=4, act_dim=1, n_costs=2).load_state_dict(state)
    with pytest.raises(ValueError, match="capacity 12 does not match"):
        ReplayBuffer(capacity=16, obs_dim=1, act_dim=1, n_costs=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'cost' has shape"):
        ReplayBuffer(capacity=12, obs_dim=1, act_dim=1, n_costs=1).load_state_dict(state)


def test_nstep_argument_checks():
    buf = toy_buffer()
    with pytest.raises(ValueError, match="gamma"):
        buf.nstep(np.array([0]), n=3, gamma=1.5)
    with pytest.raises(ValueError, match="n must be"):
        buf.nstep(np.array([0]), n=0, gamma=0.5)
    with pytest.raises(ValueError, match="integer"):
        buf.nstep(np.array([0.0]), n=3, gamma=0.5)
