"""The node's secure-aggregation sessions, driven by the real protocol server in-process."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from wharf.algorithms import models, secure_vectors
from wharf.algorithms.secagg import SecAggAborted, SecAggServer, choose_params
from wharf.identity import Identity, init_ca, issue, peer_verifier
from wharf.node.secure_session import LocalResult, SecureSessions, SecureTaskError
from wharf.proto import wharf_pb2 as pb

NAMES = ("node-a", "node-b", "node-c")
ROW_CAP = 100


@pytest.fixture
def identities(tmp_path: Path) -> dict[str, Identity]:
    init_ca(tmp_path / "ca")
    out = {}
    for n in NAMES:
        issue(tmp_path / "ca", "node", n, tmp_path / "certs")
        out[n] = Identity.load(
            tmp_path / "certs" / f"{n}.pem",
            tmp_path / "certs" / f"{n}.key",
            tmp_path / "ca" / "ca.pem",
        )
    return out


def _local_result(
    tmp_path: Path, name: str, delta: dict[str, np.ndarray], n: int
) -> Future[LocalResult]:
    path = tmp_path / f"{name}-result.safetensors"
    path.write_bytes(models.weights_to_bytes(delta))
    fut: Future[LocalResult] = Future()
    fut.set_result(LocalResult(num_examples=n, metrics={"train_loss_sum": 0.5 * n}, payload=path))
    return fut


def _task(kind: int, rnd: int, **fields: object) -> pb.Task:
    return pb.Task(task_id="t", job_id="job-1", round=rnd, kind=kind, deadline_unix=0, **fields)  # type: ignore[arg-type]


def run_round(
    identities: dict[str, Identity], sessions: dict[str, SecureSessions], tmp_path: Path, rnd: int
) -> dict[str, np.ndarray]:
    """One full secure round through SecureSessions; returns the coordinator's decoded sums."""
    rng = np.random.default_rng(rnd)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    counts = {"node-a": 10, "node-b": 30, "node-c": 60}
    params = choose_params(len(NAMES))
    layout = secure_vectors.update_layout(params, 12, ROW_CAP)
    certs = {n: identities[n].cert_pem for n in NAMES}
    ca = identities["node-a"].ca_pem
    server = SecAggServer(
        job_id="job-1",
        round_number=rnd,
        params=params,
        roster=list(NAMES),
        num_values=layout.length,
        verify=peer_verifier(certs.get, ca),
        certificates=[certs[n] for n in NAMES],
    )
    setups = server.setup_messages()
    for i, n in enumerate(NAMES, start=1):
        task = _task(
            pb.TASK_TRAIN,
            rnd,
            secure=True,
            weight_scale=ROW_CAP,
            secagg=setups[i].SerializeToString(),
        )
        work = _local_result(tmp_path, n, deltas[n], counts[n])
        server.receive_advertisement(sessions[n].start(task, work, tmp_path))
    phases = [
        ("key_directory", server.key_directories, server.receive_share_keys),
        ("share_delivery", server.share_deliveries, None),
        ("survivors", server.survivor_messages, server.receive_consistency_signature),
        ("unmask", server.unmask_requests, server.receive_unmask_response),
    ]
    from wharf.proto import secagg_pb2 as sa

    for kind, close, receive in phases:
        for i, msg in close().items():
            task = _task(pb.TASK_SECAGG, rnd, secagg_kind=kind, secagg=msg.SerializeToString())
            raw, vector = sessions[NAMES[i - 1]].phase(task, timeout=5)
            if kind == "share_delivery":
                server.receive_masked_input(sa.SecAggMaskedInput.FromString(raw), vector)
            else:
                assert receive is not None
                parsed = {
                    "key_directory": sa.SecAggShareKeys,
                    "survivors": sa.SecAggConsistencySignature,
                    "unmask": sa.SecAggUnmaskResponse,
                }[kind].FromString(raw)
                receive(parsed)
    mean, total, metrics = secure_vectors.decode_update(server.finish().decode(layout), ROW_CAP)
    expected = sum(deltas[n]["w"].astype(np.float64) * counts[n] for n in NAMES) / 100
    np.testing.assert_allclose(mean.reshape(4, 3), expected, atol=1e-5)
    assert total == 100 and metrics["train_loss_sum"] == pytest.approx(50.0, abs=1e-3)
    return {"mean": mean}


def test_full_round_through_node_sessions_gives_the_weighted_mean(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    run_round(identities, sessions, tmp_path, rnd=1)
    # The clear local result is deleted once it has been masked.
    assert not any(tmp_path.glob("*-result.safetensors"))


def test_a_node_never_contributes_twice_to_one_rounds_revealed_sum(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    run_round(identities, sessions, tmp_path, rnd=1)
    # A coordinator that "retries" round 1 after unmasking it is refused.
    retry = _task(pb.TASK_TRAIN, 1, secure=True, weight_scale=ROW_CAP, secagg=b"")
    with pytest.raises(SecureTaskError, match="already contributed"):
        sessions["node-a"].start(retry, Future(), tmp_path)
    # The next round is fine; and once the job ends the memory is released.
    run_round(identities, sessions, tmp_path, rnd=2)
    sessions["node-a"].end("job-1")
    with pytest.raises(SecAggAborted, match="setup refused"):  # judged on its merits again
        sessions["node-a"].start(retry, Future(), tmp_path)
