"""A finished job's dossier: everything an exchange operator needs to package it.

The dossier is what the coordinator knows about a job that a buyer may want to
check offline: the spec and its hash, the model's hash, per-round metrics, each
participant's signed registration certificate and signed grant, every signed and
countersigned usage receipt, the public secure-aggregation parameters, the DP
guarantee the job states, and the coordinator's signed ledger entries for the
job with its head. Records are passed on verbatim, signatures and certificates
included — the operator's product embeds them, and :mod:`wharf.product` checks
them against the CA without trusting this server.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from wharf.algorithms.secagg.params import RING_BITS

if TYPE_CHECKING:
    from wharf.coordinator.runner import Context

DOSSIER_FORMAT = "wharf-dossier/1"

__all__ = ["DOSSIER_FORMAT", "DossierError", "build_dossier"]


class DossierError(ValueError):
    """The job cannot be packaged (yet); the message says why."""


def _record(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def build_dossier(ctx: Context, job_id: str) -> dict[str, Any]:
    """The dossier of a completed job (DossierError for an unknown or unfinished job)."""
    store = ctx.store
    job = store.get_job(job_id)
    if job is None:
        raise DossierError(f"unknown job {job_id!r}")
    if job.state != "completed" or not job.model_sha:
        raise DossierError(f"job {job_id} is {job.state}; only a completed job can be packaged")
    spec = json.loads(job.spec_json)
    rounds = [
        {
            "round": r.round,
            "attempt": r.attempt,
            "nodes": list(r.nodes),
            "metrics": dict(r.metrics),
            "started": r.started,
            "finished": r.finished,
        }
        for r in store.list_rounds(job_id)
        if r.state == "completed"
    ]
    contributors = sorted({n for r in rounds for n in r["nodes"]})
    decisions = store.decisions(job_id)
    dataset = spec["data"]["dataset"]
    registrations: dict[str, str] = {}
    for node in store.list_nodes():
        for d in node["datasets"]:
            if d.get("name") == dataset:
                registrations[node["name"]] = d.get("certificate_json", "")
    participants = {
        name: {
            "grant": _record(decisions.get(name, {}).get("grant_json", "")),
            "registration": _record(registrations.get(name, "")),
        }
        for name in contributors
    }
    receipts = [
        value for r in store.receipts(job_id) if (value := _record(r["receipt_json"])) is not None
    ]
    secure = bool(spec["federation"].get("secure", True))
    entries: list[dict[str, Any]] = []
    head = {"seq": 0, "hash": ""}
    ledger = ctx.audit.ledger if ctx.audit is not None else None
    if ledger is not None:
        from wharf.product import ledger_entry_to_dict

        # The head the passport cites is this job's own entry (another job may append
        # to the ledger at any moment, so the ledger's global head would not be).
        ledger.append("dossier_exported", job_id, {"model_sha256": job.model_sha})
        for e in ledger.entries(job_id=job_id):
            entries.append(ledger_entry_to_dict(e))
        head = {"seq": entries[-1]["seq"], "hash": entries[-1]["entry_hash"]}
    privacy = store.privacy(job_id)
    return {
        "format": DOSSIER_FORMAT,
        "job": {
            "job_id": job.job_id,
            "name": job.name,
            "owner": job.owner,
            "job_hash": job.job_hash,
            "spec": spec,
            "state": job.state,
            "created": job.created,
            "updated": job.updated,
            "rounds_completed": job.rounds_completed,
            "model": {"sha256": job.model_sha, "size": job.model_size},
        },
        "rounds": rounds,
        "participants": participants,
        "receipts": receipts,
        "secure_aggregation": {
            "enabled": secure,
            "protocol": "SecAgg+ (Bell et al. 2020), malicious-coordinator parameters"
            if secure
            else "none (plaintext job)",
            "ring_bits": RING_BITS if secure else 0,
            "graph": "complete up to 64 nodes, random k-regular beyond (k = 2*ceil(log2 n) + 1)",
            "threshold": "ceil(2(k+1)/3) Shamir holders of k+1",
            "key_agreement": "X25519 + HKDF-SHA256",
            "mask_prg": "AES-128-CTR",
            "share_encryption": "AES-256-GCM",
            "shamir_field": "GF(2^127 - 1)",
        },
        "privacy": json.loads(privacy) if privacy else None,
        "ledger": {"entries": entries, "head": head},
    }


def encode(dossier: dict[str, Any]) -> str:
    """Canonical JSON text of a dossier (sorted keys, no NaN)."""
    return json.dumps(dossier, sort_keys=True, separators=(",", ":"), allow_nan=False)


VALUATION_FORMAT = "wharf-valuation/1"


def valuation_bytes(ctx: Context, job_id: str) -> bytes:
    """The valuation material of a completed ``valuation.mode = "clear"`` or ``"secure"`` job.

    One safetensors file: for every round, the model it started from
    (``r{round}/global/{tensor}``) and, in clear mode, each contributing node's update
    (``r{round}/node/{node}/{tensor}``; the metadata lists rounds, nodes and their
    example counts) or, in secure mode, the noised mean update of the training sum and
    of every leave-one-out sum (``r{round}/coalition/{all|without.<node>}/{tensor}``;
    the metadata lists each coalition's member count). An exchange operator computes
    contribution scores from it with its own validation data (:mod:`wharf.valuation`).
    """
    from safetensors.numpy import save

    from wharf.algorithms import models

    job = ctx.store.get_job(job_id)
    if job is None:
        raise DossierError(f"unknown job {job_id!r}")
    spec = json.loads(job.spec_json)
    mode = spec.get("valuation", {}).get("mode")
    if mode not in ("clear", "secure"):
        raise DossierError(
            f"job {job_id} keeps no valuation material (its spec has no valuation.mode = "
            '"clear" or "secure")'
        )
    kind = "node" if mode == "clear" else "coalition"
    if job.state != "completed":
        raise DossierError(f"job {job_id} is {job.state}; valuation needs a completed job")
    rows = ctx.store.valuation_updates(job_id)
    tensors: dict[str, Any] = {}
    rounds: dict[int, dict[str, int]] = {}
    for row in rows:
        rnd = int(row["round"])
        if rnd not in rounds:
            start = models.weights_from_bytes(ctx.blobs.get_bytes(row["start_model_sha"]))
            for name, arr in start.items():
                tensors[f"r{rnd}/global/{name}"] = arr
            rounds[rnd] = {}
        delta = models.weights_from_bytes(ctx.blobs.get_bytes(row["delta_sha"]))
        for name, arr in delta.items():
            tensors[f"r{rnd}/{kind}/{row['node']}/{name}"] = arr
        rounds[rnd][row["node"]] = int(row["num_examples"])
    meta = {
        "format": VALUATION_FORMAT,
        "job_id": job_id,
        "job_hash": job.job_hash,
        "mode": mode,
        "rounds": json.dumps({str(r): n for r, n in sorted(rounds.items())}, sort_keys=True),
    }
    return bytes(save(tensors, metadata=meta))
