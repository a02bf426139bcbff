"""An app with policies registered, for the HTTP and schemathesis tests of the policy routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bench.synthetic import write_random_artefact
from core.promotion import create_policy_from_artefact
from core.settings import Settings
from core.store import Store

ADMIN = "policy-tests-admin-token"
OBS_DIM = 6
LOW, HIGH = [-0.5, -2.0], [1.5, 0.25]
HOOKS = "slow=api.shield:speed_limiter"


@dataclass
class Served:
    client: TestClient
    store: Store
    root: Path
    tokens: dict[str, str] = field(default_factory=dict)  # role → raw token
    ids: dict[str, str] = field(default_factory=dict)  # role → token id (the "client" owning policies)
    policies: dict[str, str] = field(default_factory=dict)  # name → policy id

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def register(
        self, name: str, owner: str = "owner", shield: dict[str, Any] | None = None, certified: bool = False, **kw: Any
    ) -> str:
        """A random-weight policy of ``owner``'s client; ``certified``: with a certificate that certifies it."""
        kw = {"obs_dim": OBS_DIM, "act_low": LOW, "act_high": HIGH} | kw
        artefact = write_random_artefact(self.root / name, **kw)
        sha = json.loads((artefact / "policy.json").read_text())["weights_sha256"]
        cert = {"certified": True, "artefact_sha256": sha, "episodes": 30, "constraints": []} if certified else None
        policy = create_policy_from_artefact(
            self.store, artefact, self.ids[owner], shield=shield, job_id=f"job_{name}", certificate=cert
        )
        self.policies[name] = policy.id
        return policy.id


def served_settings(tmp: Path, **changes: Any) -> Settings:
    base = Settings(
        data_dir=tmp / "data",
        redis_url="redis://127.0.0.1:9/0",  # nothing listens: these routes never touch the broker
        api_token=ADMIN,
        reconcile_every_s=0.0,
        max_batch=16,
        act_body_limit=64 * 1024,
        shield_hooks=HOOKS,
    )
    return base.with_(**changes)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from api.app import create_app

    tmp = tmp_path_factory.mktemp("served")
    with TestClient(create_app(served_settings(tmp))) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        s = Served(client, client.app.state.store, tmp / "artefacts")
        for role, scopes in {
            "owner": ["policies:read", "policies:act"],
            "other": ["policies:read", "policies:act"],
            "act_only": ["policies:act"],
            "reader": ["policies:read"],
        }.items():
            s.ids[role], s.tokens[role] = s.store.create_token(role, scopes)
        s.register("plain")
        s.register("boxed", shield={"type": "box", "low": [-0.5, -1.5], "high": [1.0, 0.25]}, seed=1)
        s.register("hooked", shield={"type": "hook", "name": "slow"}, seed=2, act_low=None, act_high=None)
        s.register("foreign", owner="other", seed=3)
        s.register("controlled", owner="act_only", seed=4)
        yield s
