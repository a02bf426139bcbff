"""Certified policies in the service (issue #18): the gate between a checkpoint and a policy.

``cvpo.certify.certify_policy`` does the statistics; this module decides *what* to certify and
*with what*: the episode counts (job spec ``certify`` or the settings), the constraints' signals
(the job's config), which of a finished job's checkpoints to try (``candidates``), which to promote
(``auto_promote``: the best certified by the certificate's mean return), and a plain reason when
none certifies. Used by the worker at job end, by ``POST /policies`` and by on-demand evaluations.
numpy + the simulator only: importing it imports neither torch nor the trainer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from core.promotion import promote
from core.settings import Settings
from core.store import CheckpointRecord, JobRecord, PolicyRecord, Store

log = logging.getLogger("cvpo.worker")

CONFIDENCE = 0.95


def stochastic_for(episodes: int, cap: int) -> int:
    """Sampled-action episodes (reported, never certified): a third of the episodes, at most ``cap``."""
    return max(0, min(int(cap), math.ceil(episodes / 3)))


def job_params(spec: dict[str, Any] | None, settings: Settings) -> dict[str, Any]:
    """The certification parameters of a job: its spec's ``certify`` block over the settings."""
    from cvpo.certify import CERT_SEED_BASE

    block = (spec or {}).get("certify") or {}
    episodes = int(block.get("episodes") or settings.certify_episodes)
    stochastic = block.get("stochastic_episodes")
    if stochastic is None:
        stochastic = stochastic_for(episodes, settings.certify_stochastic_episodes)
    return {
        "episodes": episodes,
        "stochastic_episodes": int(stochastic),
        "seed_base": CERT_SEED_BASE,
        "confidence": CONFIDENCE,
    }


def cost_signals_of(config: dict[str, Any] | None) -> list[str] | None:
    signals = ((config or {}).get("constraints") or {}).get("cost_signals")
    return list(signals) if signals else None


def policy_signals(policy: PolicyRecord, store: Store) -> list[str] | None:
    """A policy's constraint signals: its certificate's, else its job's config (if the job remains)."""
    cert = policy.certificate or {}
    if cert.get("constraints"):
        return [c["signal"] for c in cert["constraints"]]
    if policy.job_id:
        try:
            return cost_signals_of(store.get_job(policy.job_id).config)
        except Exception:
            return None
    return None


def certify(
    artefact: Path | str,
    params: dict[str, Any],
    *,
    cost_signals: list[str] | None = None,
    cost_limits: list[float | None] | None = None,
    env_id: str | None = None,
) -> dict[str, Any]:
    """One certificate as a JSON-able dict (``ValueError`` for arguments the artefact cannot take).

    The constraints' signals are always passed explicitly (the job's, else the env's total cost for
    each of the artefact's limits), so the same artefact gets the same certificate wherever it lies
    (a run's ``best_policy`` next to its config.json, a checkpoint's artefact, a policy directory).
    """
    from cvpo.certify import certify_policy

    if not cost_signals:
        meta = json.loads((Path(artefact) / "policy.json").read_text())
        cost_signals = ["cost"] * len(meta.get("cost_limits") or [None])

    cert = certify_policy(
        artefact,
        episodes=int(params["episodes"]),
        seed_base=int(params["seed_base"]),
        cost_limits=cost_limits,
        stochastic_episodes=int(params["stochastic_episodes"]),
        env_id=env_id,
        confidence=float(params.get("confidence", CONFIDENCE)),
        cost_signals=cost_signals,
    )
    return cert.to_dict()


def _matches(cert: dict[str, Any], sha256: str, params: dict[str, Any], limits: list[Any] | None) -> bool:
    return (
        cert.get("artefact_sha256") == sha256
        and cert.get("episodes") == params["episodes"]
        and cert.get("stochastic_episodes") == params["stochastic_episodes"]
        and (cert.get("seeds") or {}).get("base") == params["seed_base"]
        and cert.get("confidence") == params.get("confidence", CONFIDENCE)
        and cert.get("env_id") == cert.get("artefact_env_id")
        and (limits is None or [c.get("limit") for c in cert.get("constraints", [])] == limits)
    )


def cached_certificate(job: JobRecord, sha256: str, params: dict[str, Any], limits: list[Any] | None) -> dict | None:
    """The certificate the worker already computed for this artefact at job end, if the parameters agree."""
    for cand in (job.promotion or {}).get("candidates") or []:
        cert = cand.get("certificate")
        if cert and _matches(cert, sha256, params, limits):
            return cert
    return None


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


def shortfall(cert: dict[str, Any]) -> str:
    """Why a certificate did not certify, in words: 'cost upper bound 61.2 > limit 25'."""
    parts = [
        f"{c['signal']} upper bound {_fmt(c['cost_upper_bound'])} > limit {_fmt(c['limit'])}"
        for c in cert.get("constraints", [])
        if not c.get("certified")
    ]
    return "; ".join(parts) or "certified"


def certificate_summary(cert: dict[str, Any] | None) -> dict[str, Any] | None:
    """The decision and per-constraint numbers without the per-episode lists (for listings)."""
    if cert is None:
        return None
    keep = ("certified", "env_id", "episodes", "stochastic_episodes", "seeds", "confidence", "return_mean", "return_ci")
    return {
        **{k: cert.get(k) for k in keep},
        "constraints": [
            {k: c.get(k) for k in ("signal", "limit", "cost_mean", "cost_upper_bound", "within_limit_share")}
            for c in cert.get("constraints", [])
        ],
    }


def _weights_sha(artefact: Path) -> str | None:
    try:
        return json.loads((artefact / "policy.json").read_text()).get("weights_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def rank_key(ck: CheckpointRecord) -> tuple:
    """The trainer's own best rule: feasible first by highest eval return, then lowest eval cost."""
    if ck.feasible:
        return (0, -(ck.eval_return if ck.eval_return is not None else -math.inf))
    return (1, ck.eval_cost if ck.eval_cost is not None else math.inf)


def candidates(store: Store, job: JobRecord, top_k: int) -> list[dict[str, Any]]:
    """The checkpoints worth certifying at job end: the best-feasible artefact, the run's served
    ``policy/`` (its validated choice under ``loop.select = "validated"``), the final checkpoint, and
    up to ``top_k`` more of the best by the trainer's eval metrics; one per distinct set of weights.
    Each: source (for ``core.promotion.promote``), roles, checkpoint id, epoch, eval numbers."""
    out: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}

    def add(source: str, role: str, artefact: Path, ck: CheckpointRecord | None, summary: dict | None = None) -> None:
        sha = _weights_sha(artefact)
        if sha is None:
            return
        if sha in seen:
            seen[sha]["roles"].append(role)
            return
        entry = {
            "source": source,
            "roles": [role],
            "checkpoint_id": ck.id if ck else None,
            "epoch": ck.epoch if ck else (summary or {}).get("epoch"),
            "eval_return": ck.eval_return if ck else (summary or {}).get("eval_return"),
            "eval_cost": ck.eval_cost if ck else (summary or {}).get("eval_cost"),
            "artefact": str(artefact),
            "weights_sha256": sha,
        }
        seen[sha] = entry
        out.append(entry)

    # The trainer's best-feasible artefact, then the run's own choice (its validated epoch under loop.select).
    for source, role, name in (("best", "best-feasible", "best_policy"), ("served", "served", "policy")):
        artefact = Path(job.run_dir) / name
        if (artefact / "policy.json").is_file():
            try:
                summary = json.loads((artefact / "policy.json").read_text()).get("summary") or {}
            except (OSError, json.JSONDecodeError):
                summary = {}
            add(source, role, artefact, None, summary)
    ckpts = [ck for ck in store.list_checkpoints(job.id) if ck.artefact_path]
    ckpts = [ck for ck in ckpts if (Path(ck.artefact_path or "") / "policy.json").is_file()]
    if ckpts:
        add(ckpts[-1].id, "final", Path(ckpts[-1].artefact_path or ""), ckpts[-1])
    ranked = sorted(ckpts, key=rank_key)
    extra = 0
    for ck in ranked:
        if extra >= top_k:
            break
        before = len(out)
        add(ck.id, "top-by-eval", Path(ck.artefact_path or ""), ck)
        extra += len(out) > before
    return out


def auto_promote(store: Store, job: JobRecord, settings: Settings) -> tuple[str | None, dict[str, Any]]:
    """Certify the candidates, promote the best certified one (by certificate mean return).

    Returns (policy id or None, the job's ``promotion`` block). Never raises for a candidate that
    cannot be certified: its error is recorded and the others are tried.
    """
    params = job_params(job.spec, settings)
    signals = cost_signals_of(job.config)
    tried: list[dict[str, Any]] = []
    for cand in candidates(store, job, settings.certify_candidates):
        entry = {k: v for k, v in cand.items() if k != "artefact"}
        try:
            cert = certify(cand["artefact"], params, cost_signals=signals)
            entry.update(certified=bool(cert["certified"]), return_mean=cert["return_mean"], certificate=cert)
            if not cert["certified"]:
                entry["reason"] = shortfall(cert)
        except Exception as exc:  # one broken artefact must not cost the job its other candidates
            log.exception("certifying %s of %s failed", cand["source"], job.id)
            entry.update(certified=False, error=f"{type(exc).__name__}: {exc}"[:500])
        tried.append(entry)
    promotion: dict[str, Any] = {"params": params, "candidates": tried, "policy_id": None, "source": None}
    passed = [c for c in tried if c.get("certified")]
    if not tried:
        promotion.update(certified=False, reason="no candidate: the job wrote no policy artefact")
        return None, promotion
    if not passed:
        reasons = [f"{c['source']}: {c.get('reason') or c.get('error')}" for c in tried]
        promotion.update(certified=False, reason="no candidate certified: " + "; ".join(reasons))
        return None, promotion
    chosen = max(passed, key=lambda c: c["return_mean"])  # max keeps the first of equals
    policy = promote(store, job=job, source=chosen["source"], client=job.client, certificate=chosen["certificate"])
    promotion.update(policy_id=policy.id, source=chosen["source"], certified=True, reason=None)
    return policy.id, promotion
