"""End to end with real processes: coordinator + node daemons over mTLS, real torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fedutil import HOSPITALS, model_accuracy, spec, start_federation, wait_until

from wharf import spec as spec_mod

pytestmark = pytest.mark.slow


def test_three_nodes_three_rounds_model_downloaded_and_evaluated(tmp_path: Path) -> None:
    fed, test = start_federation(tmp_path)
    with fed:
        with fed.client() as client:
            info = client.submit(spec_mod.from_dict(spec(3, secure=False)))
            final = client.wait(info.job_id)
            assert final.state == "completed", final.reason
            assert final.rounds_completed == 3
            assert [r.round for r in final.rounds] == [1, 2, 3]
            assert all(sorted(r.nodes) == list(HOSPITALS) for r in final.rounds)
            ref = client.download_model(info.job_id, tmp_path / "model.safetensors")
        assert ref.sha256 == final.model.sha256
        acc = model_accuracy(tmp_path / "model.safetensors", test, [16])
        assert acc > 0.85, acc
        # Workspaces are deleted at job end.
        for h in HOSPITALS:
            work = tmp_path / "nodes" / h / "state" / "work" / info.job_id
            wait_until(lambda w=work: not w.exists(), 30, f"{h} workspace cleanup", fed)


def test_node_killed_mid_round_then_rejoins_with_same_identity(tmp_path: Path) -> None:
    fed, _ = start_federation(tmp_path)
    with fed:
        with fed.client() as client:
            # Slow enough local training that the kill lands inside a round.
            job = client.submit(spec_mod.from_dict(spec(6, secure=False, min_nodes=2, epochs=40)))
            events = client.watch(job.job_id)
            for ev in events:
                if ev.kind == "round_started" and ev.round == 2:
                    break
            fed.kill("hospital-c")
            for ev in events:
                if ev.kind in ("round_completed", "round_failed") and ev.round == 2:
                    break
            fed.restart("hospital-c")
            final = client.wait(job.job_id)
        assert final.state == "completed", final.reason
        by_round = {r.round: r for r in final.rounds}
        assert "hospital-c" not in by_round[2].nodes
        assert len(by_round[2].nodes) >= 2
        # After the restart the same identity takes part again.
        assert any("hospital-c" in by_round[r].nodes for r in range(3, 7))


def test_coordinator_killed_and_restarted_resumes_job(tmp_path: Path) -> None:
    fed, _ = start_federation(tmp_path)
    with fed:
        with fed.client() as client:
            job = client.submit(spec_mod.from_dict(spec(5, secure=False)))
            for ev in client.watch(job.job_id):
                if ev.kind == "round_completed" and ev.round == 2:
                    break
            before = client.get(job.job_id)
        fed.kill("coordinator")
        done_before = {
            r.round: r.model_sha256 if hasattr(r, "model_sha256") else None
            for r in before.rounds
            if r.state == "completed"
        }
        fed.restart("coordinator")
        with fed.client() as client:
            final = client.wait(job.job_id)
            assert final.state == "completed", final.reason
            rounds = [r.round for r in final.rounds]
            assert rounds == [1, 2, 3, 4, 5]  # none lost, none repeated
            # Rounds completed before the kill are unchanged after the restart.
            for r in final.rounds:
                if r.round in done_before:
                    old = next(o for o in before.rounds if o.round == r.round)
                    assert r.finished == old.finished and dict(r.metrics) == dict(old.metrics)
            messages = [ev.message for ev in client.watch(job.job_id)]
        assert any("resuming after round" in m for m in messages)


def test_developer_bundle_job(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).parent / "data" / "bundle_model", bundle)
    fed, _ = start_federation(tmp_path, nodes=HOSPITALS[:2])
    with fed:
        raw = spec(2, secure=False, min_nodes=2)
        raw["model"] = {"kind": "bundle", "num_classes": 2, "input_shape": [30]}
        raw["bundle"] = {
            "path": str(bundle),
            "model": "net:build_model",
            "train_step": "net:train_step",
        }
        with fed.client() as client:
            job = client.submit(spec_mod.from_dict(raw))
            assert len(job.job_hash) == 64
            # Code bundles are never auto-approved: each operator reads the code, then approves.
            for h in HOSPITALS[:2]:
                wait_until(
                    lambda h=h: any(
                        g.node == h and g.outcome == "pending"
                        for g in client.get(job.job_id).grants
                    ),
                    60,
                    f"{h} pending",
                    fed,
                )
                shown = fed.node_cli(h, ["node", "grant", "show", job.job_id])
                assert "def train_step" in shown  # the bundle's code is shown to the operator
                fed.node_cli(h, ["node", "grant", "approve", job.job_id])
            final = client.wait(job.job_id)
            assert final.state == "completed", final.reason
            client.download_model(job.job_id, tmp_path / "m.safetensors")
        from wharf.algorithms.models import weights_from_bytes

        names = set(weights_from_bytes((tmp_path / "m.safetensors").read_bytes()))
        assert names == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
