"""Promotion: pick a job's artefact, verify it, copy it into an immutable policy directory, register it.

The store only registers the result (``Store.register_policy``); which artefact a source names, loading
and checking it and the files on disk are this module's. Callers: the worker's automatic promotion
(core/certification.py) and ``POST /policies`` (api/routes/policies.py); tests and benchmarks register
artefacts in place with ``create_policy_from_artefact``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.store import ConflictError, JobRecord, NotFoundError, PolicyRecord, Store, new_id, rfc3339


def resolve_artefact(store: Store, job: JobRecord, source: str) -> tuple[str | None, Path]:
    """(checkpoint id or None for "best"/"served", artefact directory) of a promotion source; NotFoundError.

    "served" is the policy the finished run hands out as ``policy/`` (with ``loop.select =
    "validated"`` the epoch its validation layouts chose, docs/safety-margin.md).
    """
    ckpt_id: str | None = None
    if source in ("best", "served"):
        artefact = Path(job.run_dir) / ("best_policy" if source == "best" else "policy")
    else:
        ckpts = [ck for ck in store.list_checkpoints(job.id) if ck.artefact_path]
        if source == "final":
            if not ckpts:
                raise NotFoundError(f"job {job.id} has no checkpoint yet")
            chosen = ckpts[-1]
        else:
            found = [ck for ck in ckpts if ck.id == source]
            if not found:
                raise NotFoundError(f"job {job.id} has no checkpoint {source!r}")
            chosen = found[0]
        ckpt_id, artefact = chosen.id, Path(chosen.artefact_path or "")
    if not (artefact / "policy.json").is_file():
        raise NotFoundError(f"job {job.id} has no {source!r} policy artefact yet")
    return ckpt_id, artefact


def promote(
    store: Store,
    *,
    job: JobRecord,
    source: str,
    client: str,
    shield: dict[str, Any] | None = None,
    validate_shield: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None] | None = None,
    certificate: dict[str, Any] | None = None,
    override: dict[str, Any] | None = None,
) -> PolicyRecord:
    """Copy an artefact into an immutable policy directory and register it with its certificate.

    ``source`` is ``"best"`` (the best-feasible artefact), ``"served"`` (the run's ``policy/``),
    ``"final"`` (the newest checkpoint's) or a checkpoint id. ``validate_shield(spec, meta)``
    returns the normalised spec or raises.
    ``certificate`` is the artefact's (``Certificate.to_dict()``); the policy is ``certified``
    exactly when it says so. ``override`` ({"reason", "actor"}) records an admin's promotion of
    an uncertified checkpoint. The gate itself is the caller's (worker, API route).
    NotFoundError: no such source; ConflictError: an unusable artefact or another artefact's certificate.
    """
    from cvpo.artefact import ArtefactError, load_policy  # numpy only

    ckpt_id, artefact = resolve_artefact(store, job, source)
    try:
        runtime = load_policy(artefact)
    except ArtefactError as exc:
        raise ConflictError(f"artefact for {source!r} is unusable: {exc}") from exc
    if shield is not None and validate_shield is not None:
        shield = validate_shield(shield, runtime.meta)  # may normalise ({"type": "none"} → None)
    policy_id = new_id("pol")
    dest = store.data_dir / "policies" / policy_id
    tmp = dest.with_name(f".tmp-{policy_id}")
    shutil.copytree(artefact, tmp)
    tmp.rename(dest)
    raw_meta = (dest / "policy.json").read_bytes()
    meta = json.loads(raw_meta)
    if certificate is not None and certificate.get("artefact_sha256") != meta["weights_sha256"]:
        shutil.rmtree(dest, ignore_errors=True)
        raise ConflictError(f"the certificate is for another artefact than {source!r}'s")
    if certificate is not None:
        (dest / "certificate.json").write_text(json.dumps(certificate, indent=2) + "\n")
    certified = bool(certificate and certificate.get("certified"))
    # An override only means something for a checkpoint that did not certify.
    override = {**override, "at": rfc3339(time.time())} if override is not None and not certified else None
    return store.register_policy(
        policy_id=policy_id,
        client=client,
        path=dest,
        meta=meta,
        meta_sha256=hashlib.sha256(raw_meta).hexdigest(),  # policy.json as promoted (issue #23 item 10)
        job_id=job.id,
        checkpoint_id=ckpt_id,
        shield=shield,
        certificate=certificate,
        override=override,
    )


def create_policy_from_artefact(
    store: Store,
    artefact: Path,
    client: str,
    shield: dict[str, Any] | None = None,
    job_id: str | None = None,
    certificate: dict[str, Any] | None = None,
) -> PolicyRecord:
    """Register an artefact directory that already lies in its final place (tests, benchmarks): no copy."""
    raw_meta = (Path(artefact) / "policy.json").read_bytes()
    return store.register_policy(
        policy_id=new_id("pol"),
        client=client,
        path=Path(artefact),
        meta=json.loads(raw_meta),
        meta_sha256=hashlib.sha256(raw_meta).hexdigest(),
        job_id=job_id,
        shield=shield,
        certificate=certificate,
    )
