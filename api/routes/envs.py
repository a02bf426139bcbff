"""The task catalogue and presets (static config)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.auth import require
from api.errors import Problem
from core.store import Principal
from cvpo.config import load_presets, preset_for
from cvpo.envs.catalogue import UnknownTaskError, get_task, list_tasks

router = APIRouter(tags=["catalogue"])
Reader = Annotated[Principal, Depends(require("jobs:read"))]


def _task_view(task: Any) -> dict[str, Any]:
    return {
        "id": task.id,
        "family": task.family,
        "observation_space": {"shape": [task.obs_dim], "low": None, "high": None},
        "action_space": {"shape": [task.act_dim], "low": list(task.act_low), "high": list(task.act_high)},
        "max_episode_steps": task.max_episode_steps,
        "cost_limit": task.cost_limit,
        "cost": task.cost,
        "preset": preset_for(task.id) or None,
    }


@router.get("/envs", summary="Supported safety-gymnasium tasks")
def list_envs(_: Reader) -> dict[str, Any]:
    return {"items": [_task_view(t) for t in list_tasks()]}


@router.get("/envs/{env_id}", summary="One task", responses={404: {"description": "Unknown task"}})
def get_env(env_id: str, _: Reader) -> dict[str, Any]:
    try:
        return _task_view(get_task(env_id))
    except UnknownTaskError as exc:
        raise Problem(404, str(exc)) from exc


@router.get("/presets", summary="Per-task-family engine presets")
def list_presets(_: Reader) -> dict[str, Any]:
    return {"items": [{"id": k, **v} for k, v in sorted(load_presets().items())]}


@router.get("/presets/{preset_id}", summary="One preset", responses={404: {"description": "Unknown preset"}})
def get_preset(preset_id: str, _: Reader) -> dict[str, Any]:
    presets = load_presets()
    if preset_id not in presets:
        raise Problem(404, f"unknown preset {preset_id!r}; valid: {', '.join(sorted(presets))}")
    return {"id": preset_id, **presets[preset_id]}
