"""Secure aggregation end to end: real processes, real TLS, real torch."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fedutil import HOSPITALS, model_accuracy, spec, start_federation

from wharf import spec as spec_mod
from wharf.node.wirelog import read_wire_log
from wharf.proto import secagg_pb2 as sa
from wharf.proto import wharf_pb2 as pb

pytestmark = pytest.mark.slow

CANARY = 987654.321


def chi_square_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def uniform_bound(dof: int = 255, sigmas: float = 7.0) -> float:
    # Chi-square(255): mean 255, sd sqrt(510); 7 sd leaves a false alarm far below 1e-9.
    return dof + sigmas * math.sqrt(2 * dof)


def uploads(log: Path) -> list[tuple[pb.ResultHeader, bytes]]:
    """(header, payload) of every UploadResult the node sent."""
    out: list[tuple[pb.ResultHeader, bytes]] = []
    for method, raw in read_wire_log(log):
        if not method.endswith("/UploadResult"):
            continue
        chunk = pb.UploadChunk.FromString(raw)
        if chunk.WhichOneof("part") == "header":
            out.append((chunk.header, b""))
        else:
            header, data = out[-1]
            out[-1] = (header, data + chunk.data)
    return out


def test_secure_equals_plaintext_accuracy_and_nothing_raw_leaves(tmp_path: Path) -> None:
    def plant(name: str, part: pd.DataFrame) -> pd.DataFrame:
        if name == "hospital-a":
            part.loc[0, "mean_radius"] = CANARY
        return part

    fed, test = start_federation(
        tmp_path, node_options={"hospital-a": {"wire_log": "sent.log"}}, edit=plant
    )
    accuracies = {}
    with fed:
        with fed.client() as client:
            for secure in (True, False):
                raw = spec(8, secure=secure, hidden=None)
                raw["model"]["hidden"] = [64]  # type: ignore[index]
                info = client.submit(spec_mod.from_dict(raw))
                final = client.wait(info.job_id)
                assert final.state == "completed", final.reason
                assert all(sorted(r.nodes) == list(HOSPITALS) for r in final.rounds)
                path = tmp_path / f"model-{secure}.safetensors"
                client.download_model(info.job_id, path)
                accuracies[secure] = model_accuracy(path, test, [64])
                if secure:
                    secure_job = info.job_id
    # The demo job with secure aggregation reaches the plaintext accuracy.
    assert abs(accuracies[True] - accuracies[False]) <= 0.005, accuracies
    assert accuracies[True] > 0.9

    log = tmp_path / "nodes" / "hospital-a" / "sent.log"
    sent = b"".join(raw for _, raw in read_wire_log(log))
    for needle in (
        struct.pack("<f", CANARY),
        struct.pack("<d", CANARY),
        b"987654",
        b"987654.3",
    ):
        assert needle not in sent, f"canary {needle!r} left the node"

    secure_uploads = [(h, d) for h, d in uploads(log) if h.job_id == secure_job]
    masked = [d for h, d in secure_uploads if h.kind == pb.TASK_SECAGG and d]
    assert masked, "no masked vector captured"
    for header, data in secure_uploads:
        if header.kind in (pb.TASK_TRAIN, pb.TASK_STATS):
            assert not data, "a secure round must not upload a clear result"
    for vec in masked:
        assert chi_square_bytes(vec) < uniform_bound(), "masked vector is not uniform"
    # The test has power: the plaintext job's clear updates are far from uniform.
    clear = [d for h, d in uploads(log) if h.job_id != secure_job and h.kind == pb.TASK_TRAIN]
    assert clear and all(chi_square_bytes(d) > uniform_bound() for d in clear)
    # Every masked-input message carries only a digest; the vector is the payload.
    for h, _ in secure_uploads:
        if h.kind == pb.TASK_SECAGG and h.blob.size:
            msg = sa.SecAggMaskedInput.FromString(h.secagg)
            assert not msg.masked_vector and len(msg.vector_sha256) == 32


def test_secure_round_survives_a_node_killed_mid_round(tmp_path: Path) -> None:
    fed, _ = start_federation(tmp_path)
    with fed:
        with fed.client() as client:
            job = client.submit(spec_mod.from_dict(spec(4, min_nodes=2, epochs=60)))
            events = client.watch(job.job_id)
            for ev in events:
                if ev.kind == "round_started" and ev.round == 2:
                    break
            fed.kill("hospital-c")
            final = client.wait(job.job_id)
        assert final.state == "completed", final.reason
        by_round = {r.round: r for r in final.rounds}
        assert sorted(by_round[2].nodes) == ["hospital-a", "hospital-b"]
        assert all(len(r.nodes) >= 2 for r in final.rounds)
