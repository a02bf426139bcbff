"""The only way ``safety_gymnasium`` is imported in this project.

safety-gymnasium 1.0.0 does not import on Python 3.11 as published, and every navigation reset
spends ~1.1 s decoding six 3259x3259 skybox PNGs (environment-notes.md §2 and §4). This module
fixes both without copying or editing its source:

1. **Array dataclass defaults.** Twelve ``color`` fields default to numpy arrays, which Python
   3.11's dataclasses reject as mutable. While (and only while) safety-gymnasium is imported, and
   only for classes defined in it, such a default becomes a ``default_factory`` returning the same
   array. That is what Python 3.10 did: safety-gymnasium only reads these arrays.
2. **gymnasium-robotics.** Only the multi-agent tasks need it, yet the package imports it
   unconditionally and it would force numpy<1.24. A stand-in module lets the single-agent tasks
   import; ``make_ma`` then fails with a clear message.
3. **Fast resets.** ``World.build`` reads ``configs/assets.yaml`` on every reset and asks MuJoCo to
   decode the "star_hd" skybox. The yaml is parsed once and the skybox swapped for MuJoCo's
   built-in gradient. Layout sampling, the random stream and physics are untouched, so
   observations, rewards and costs stay bit-identical (tests/cvpo/test_envs_identity.py); only
   rendered images show another background. ``stock_skybox()`` turns it off, for comparisons.
4. **Vectorised pseudo-lidar.** Navigation observations spend most of a step in
   ``_obs_lidar_pseudo``, a Python loop over every object (three lidars per Goal step).
   ``install_fast_lidar(task)`` gives one task instance the same arithmetic over all objects at
   once (the same NumPy kernels element by element, so the readings are bit-identical,
   tests/cvpo/test_envs_identity.py); envs made with ``fast_reset=False`` keep the stock loop.

Importing ``safety_gymnasium`` directly anywhere else would import it unpatched (and fail on 3.11).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np

_PACKAGE = "safety_gymnasium"
_ROBOTICS_STUB_MODULES = (
    "gymnasium_robotics",
    "gymnasium_robotics.envs",
    "gymnasium_robotics.envs.multiagent_mujoco",
    "gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi",
)
_MULTI_AGENT_MESSAGE = (
    "multi-agent safety-gymnasium tasks need gymnasium-robotics, which this service does not "
    "install (it forces numpy<1.24); only the single-agent tasks in `cvpo envs` are supported"
)

# The built-in MuJoCo texture that replaces the six decoded PNGs. Only rendering sees it.
FAST_SKYBOX: dict[str, Any] = {
    "@type": "skybox",
    "@builtin": "gradient",
    "@rgb1": "0.05 0.05 0.12",
    "@rgb2": "0 0 0",
    "@width": "64",
    "@height": "64",
}

_stock_skybox: contextvars.ContextVar[bool] = contextvars.ContextVar("cvpo_stock_skybox", default=False)
_module: types.ModuleType | None = None


@contextlib.contextmanager
def skybox(fast: bool) -> Iterator[None]:
    """Within this block, worlds are built with the fast skybox or safety-gymnasium's own."""
    token = _stock_skybox.set(not fast)
    try:
        yield
    finally:
        _stock_skybox.reset(token)


def stock_skybox() -> contextlib.AbstractContextManager[None]:
    """Build worlds exactly as stock safety-gymnasium does (slow resets), e.g. for comparisons."""
    return skybox(fast=False)


def _same_object(value: Any) -> Any:
    return value


@contextlib.contextmanager
def _array_defaults_allowed(prefix: str) -> Iterator[None]:
    """Let dataclasses defined under ``prefix`` use numpy arrays as defaults, as on Python 3.10."""
    original = dataclasses._get_field  # private, but with the same signature on 3.10-3.13
    params = list(inspect.signature(original).parameters)
    if params[:3] != ["cls", "a_name", "a_type"]:
        raise RuntimeError(f"unexpected dataclasses._get_field signature {params}; update cvpo.envs.compat")

    def get_field(cls: type, a_name: str, a_type: Any, *args: Any) -> dataclasses.Field:
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        if cls.__module__.startswith(prefix + ".") and isinstance(default, np.ndarray):
            factory = functools.partial(_same_object, default)
            setattr(cls, a_name, dataclasses.field(default_factory=factory))
        return original(cls, a_name, a_type, *args)

    dataclasses._get_field = get_field
    try:
        yield
    finally:
        dataclasses._get_field = original


class _MultiAgentUnavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_MULTI_AGENT_MESSAGE)


@contextlib.contextmanager
def _robotics_stand_in() -> Iterator[None]:
    """Provide an empty gymnasium_robotics during the import if the real one is absent."""
    if importlib.util.find_spec("gymnasium_robotics") is not None:
        yield
        return
    stubs = {name: types.ModuleType(name) for name in _ROBOTICS_STUB_MODULES}
    stubs[_ROBOTICS_STUB_MODULES[-1]].MultiAgentMujocoEnv = _MultiAgentUnavailable  # type: ignore[attr-defined]
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


class _CachedAssetsYaml:
    """Stands in for the ``yaml`` module inside ``safety_gymnasium.world``.

    world.py calls ``yaml.load`` once per reset, only for ``configs/assets.yaml``. The parse is done
    once; each call gets a deep copy (callers put its dicts into the XML tree) with the fast skybox.
    """

    def __init__(self, real_yaml: types.ModuleType) -> None:
        self._yaml = real_yaml
        self._cache: dict[str, Any] = {}
        self.FullLoader = real_yaml.FullLoader  # world.py passes Loader=yaml.FullLoader

    def load(self, stream: Any, Loader: Any = None) -> Any:
        key = getattr(stream, "name", None)
        if key is None:  # not a file we can cache by name: behave exactly like yaml
            return self._yaml.load(stream, Loader=Loader)
        if key not in self._cache:
            self._cache[key] = self._yaml.load(stream, Loader=Loader)
        config = copy.deepcopy(self._cache[key])
        textures = config.get("textures") if isinstance(config, dict) else None
        if textures and "skybox" in textures and not _stock_skybox.get():
            textures["skybox"] = dict(FAST_SKYBOX)
        return config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._yaml, name)


def _install_fast_reset(module: types.ModuleType) -> None:
    world = importlib.import_module(f"{module.__name__}.world")
    if not isinstance(world.yaml, _CachedAssetsYaml):
        world.yaml = _CachedAssetsYaml(world.yaml)


def safety_gymnasium() -> types.ModuleType:
    """Import (once) and return safety_gymnasium with the Python 3.11 fixes and fast resets."""
    global _module
    if _module is not None:
        return _module
    if _PACKAGE in sys.modules:
        raise RuntimeError(
            "safety_gymnasium was imported before cvpo.envs.compat; import it only through "
            "cvpo.envs.compat.safety_gymnasium()"
        )
    try:
        with _array_defaults_allowed(_PACKAGE), _robotics_stand_in():
            module = importlib.import_module(_PACKAGE)
    except ImportError as exc:
        raise ImportError(
            f"safety-gymnasium is not installed ({exc}); run scripts/setup.sh, which installs it "
            "with --no-deps from requirements-nodeps.txt"
        ) from exc

    def make_ma(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_MULTI_AGENT_MESSAGE)

    if "gymnasium_robotics" not in sys.modules:
        module.make_ma = make_ma
    _install_fast_reset(module)
    _module = module
    return module


def _lidar_pseudo(task: Any, positions: Any) -> np.ndarray:
    """``BaseTask._obs_lidar_pseudo`` over all positions at once, bit for bit (§4 of the module doc).

    Per object, as the stock loop: the ego-frame XY (the same (1, 3) @ (3, 3) product), distance and
    angle of that complex number, its bin, the sensor reading and the aliased neighbours, written
    into that object's row; the bins then take the maximum over rows, which is exact in any order.
    Shapes the stock loop rejects, and single objects (no loop to save), go to the stock method.
    """
    pos = np.array(positions, ndmin=2)
    if pos.ndim != 2 or pos.shape[1] not in (2, 3) or pos.shape[0] < 2:
        return type(task)._obs_lidar_pseudo(task, positions)
    conf = task.lidar_conf
    k = pos.shape[0]
    world = np.zeros((k, 3))
    world[:, :2] = pos[:, :2]
    world -= task.agent.pos
    ego = np.matmul(world[:, None, :], task.agent.mat)
    z = ego[:, 0, 0] + 1j * ego[:, 0, 1]
    dist = np.abs(z)
    angle = np.angle(z) % (np.pi * 2)
    n = conf.num_bins
    bin_size = (np.pi * 2) / n
    bins = (angle / bin_size).astype(np.intp)
    if conf.max_dist is None:
        sensor = np.exp(-conf.exp_gain * dist)
    else:
        sensor = np.maximum(0, conf.max_dist - dist) / conf.max_dist
    rows = np.arange(k)
    reading = np.zeros((k, n))
    reading[rows, bins] = sensor
    if conf.alias:
        alias = (angle - bin_size * bins) / bin_size
        if not ((alias >= 0) & (alias <= 1)).all():
            raise AssertionError(f"bad lidar alias {alias}")
        for side, value in (((bins + 1) % n, alias * sensor), ((bins - 1) % n, (1 - alias) * sensor)):
            reading[rows, side] = np.maximum(reading[rows, side], value)
    return reading.max(axis=0)


def install_fast_lidar(task: Any) -> None:
    """Give one safety-gymnasium task instance the vectorised pseudo-lidar (a no-op for other lidars)."""
    task._obs_lidar_pseudo = types.MethodType(_lidar_pseudo, task)
