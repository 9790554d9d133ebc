"""The node's secure-aggregation sessions, driven by the real protocol server in-process."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from wharf.algorithms import models, secure_vectors
from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.plan import JobPrivacy
from wharf.algorithms.privacy.skellam import SkellamPlan, make_plan
from wharf.algorithms.secagg import SecAggServer, choose_params
from wharf.identity import Identity, init_ca, issue, peer_verifier
from wharf.node.secure_session import LocalResult, SecureSessions, SecureTaskError
from wharf.node.state import NodeState
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
    # The next round is fine; and the end of the job does not make round 1 fair game.
    run_round(identities, sessions, tmp_path, rnd=2)
    sessions["node-a"].end("job-1")
    with pytest.raises(SecureTaskError, match="already contributed"):
        sessions["node-a"].start(retry, Future(), tmp_path)


def test_revealed_rounds_survive_a_restart_of_the_node(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    state = NodeState(tmp_path / "state")
    sessions = {
        n: SecureSessions(
            n,
            identities[n].signer().sign,
            identities[n].ca_pem,
            releases=state if n == "node-a" else None,
        )
        for n in NAMES
    }
    run_round(identities, sessions, tmp_path, rnd=1)
    assert state.released_rounds("job-1") == [1]
    state.close()
    # A new process, the same database: round 1 is still refused.
    again = SecureSessions(
        "node-a",
        identities["node-a"].signer().sign,
        identities["node-a"].ca_pem,
        releases=NodeState(tmp_path / "state"),
    )
    retry = _task(pb.TASK_TRAIN, 1, secure=True, weight_scale=ROW_CAP, secagg=b"")
    with pytest.raises(SecureTaskError, match="already contributed"):
        again.start(retry, Future(), tmp_path)


def run_dp_round(
    identities: dict[str, Identity],
    sessions: dict[str, SecureSessions],
    tmp_path: Path,
    deltas: dict[str, dict[str, np.ndarray]],
    plan: SkellamPlan,
    drop: str | None = None,
) -> np.ndarray:
    """A participant-level DP round through SecureSessions; ``drop`` sends no masked input.
    Returns the coordinator's decoded mean update."""
    from wharf.proto import secagg_pb2 as sa

    privacy = JobPrivacy(None, None, plan)
    params = choose_params(len(NAMES))
    layout = secure_vectors.dp_update_layout(params, plan)
    certs = {n: identities[n].cert_pem for n in NAMES}
    server = SecAggServer(
        job_id="job-1",
        round_number=1,
        params=params,
        roster=list(NAMES),
        num_values=layout.length,
        verify=peer_verifier(certs.get, identities["node-a"].ca_pem),
        certificates=[certs[n] for n in NAMES],
    )
    setups = server.setup_messages()
    for i, n in enumerate(NAMES, start=1):
        task = _task(
            pb.TASK_TRAIN,
            1,
            secure=True,
            weight_scale=ROW_CAP,
            secagg=setups[i].SerializeToString(),
        )
        work = _local_result(tmp_path, n, deltas[n], 10)
        server.receive_advertisement(sessions[n].start(task, work, tmp_path, privacy))
    phases = [
        ("key_directory", server.key_directories, server.receive_share_keys),
        ("share_delivery", server.share_deliveries, None),
        ("survivors", server.survivor_messages, server.receive_consistency_signature),
        ("unmask", server.unmask_requests, server.receive_unmask_response),
    ]
    for kind, close, receive in phases:
        for i, msg in close().items():
            name = NAMES[i - 1]
            if kind == "share_delivery" and name == drop:
                continue
            task = _task(pb.TASK_SECAGG, 1, secagg_kind=kind, secagg=msg.SerializeToString())
            raw, vector = sessions[name].phase(task, timeout=5)
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
    sums = server.finish().decode(layout)
    survivors = [n for n in NAMES if n != drop]
    return skellam.decode_sum(np.asarray(sums["update"], np.int64), len(survivors), plan)


def test_a_participant_level_round_releases_only_the_noised_uniform_mean(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    deltas["node-c"]["w"] *= 100  # far beyond the clip: clipped to norm 1
    plan = make_plan(1.0, 12, 2, 8, 1e-3)
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    mean = run_dp_round(identities, sessions, tmp_path, deltas, plan)
    clipped = []
    for n in NAMES:
        w = deltas[n]["w"].astype(np.float64).ravel()
        clipped.append(w * min(1.0, 1.0 / np.linalg.norm(w)))
    expected = np.mean(clipped, axis=0)  # uniform weights, not the example counts
    # Aggregate noise std in model units: z * C / 3 contributors (+ rounding 1/scale).
    tol = 6 * (plan.noise_multiplier * plan.clip / 3) + 3 / plan.scale
    np.testing.assert_allclose(mean, expected, atol=tol)
    assert abs(mean - expected).max() > 0  # noise is there


def test_nodes_refuse_to_unmask_a_sum_with_too_few_noise_shares(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    plan = make_plan(1.0, 12, 3, 8, 1.0)  # every one of the three shares is needed
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    with pytest.raises(SecureTaskError, match="needs at least 3 noise shares"):
        run_dp_round(identities, sessions, tmp_path, deltas, plan, drop="node-c")
    assert all(sessions[n].releases.released_rounds("job-1") == [] for n in NAMES)
