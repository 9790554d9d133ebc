"""Differential privacy end to end: real coordinator and node processes over mTLS, a job
with record-level DP-SGD (Opacus) and participant-level Skellam noise under secure
aggregation, its stated guarantee, the nodes' budget ledgers, and a second job refused
for lack of budget after a node restart.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from fedutil import HOSPITALS, spec, start_federation

from wharf import spec as spec_mod
from wharf.algorithms.privacy.accounting import Guarantee
from wharf.datasets import scale_to_published_ranges

pytestmark = pytest.mark.slow

BUDGET_POLICY = """\
allowed_purposes = ["medical-research"]

[budget]
epsilon = 6.0
delta = 1e-4

[[auto_approve]]
requester = "alice"
purpose = "medical-research"
max_level = "general"
"""


def dp_job(wait_s: float = 60.0) -> spec_mod.JobSpec:
    raw = spec(3, min_nodes=3, timeout=90.0, lr=0.05)
    raw["model"] = {"kind": "mlp", "num_classes": 2, "hidden": [16], "standardize": False}
    raw["federation"]["wait_for_nodes_s"] = wait_s  # type: ignore[index]
    raw["privacy"] = {
        "record_level": {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0},
        "participant_level": {"epsilon": 4.0, "delta": 1e-5, "clip": 0.5},
    }
    return spec_mod.from_dict(raw)


def test_a_dp_job_states_its_guarantee_and_the_budget_holds_across_a_restart(
    tmp_path: Path,
) -> None:
    fed, _ = start_federation(
        tmp_path,
        policies={h: BUDGET_POLICY for h in HOSPITALS},
        edit=lambda _name, frame: scale_to_published_ranges(frame),
    )
    with fed, fed.client() as client:
        job = client.submit(dp_job())
        final = client.wait(job.job_id)
        assert final.state == "completed", final.reason
        assert [r.round for r in final.rounds] == [1, 2, 3]
        for r in final.rounds:
            assert sorted(r.nodes) == list(HOSPITALS)
            # Only the noised update is released: no loss, accuracy or example counts.
            assert not {"train_loss", "global_accuracy", "num_examples"} & set(r.metrics)

        # The job's final record states the guarantee, recomputable from its parameters.
        report = json.loads(final.privacy_json)
        part = Guarantee.from_dict(report["participant_level"])
        assert 0.99 * 4.0 <= part.epsilon <= 4.0
        assert part.recompute() == pytest.approx(part.epsilon, rel=1e-6)
        assert part.mechanism["rounds"] == 3 and part.mechanism["min_contributors"] == 3
        assert sorted(report["record_level"]) == list(HOSPITALS)
        for g in report["record_level"].values():
            rec = Guarantee.from_dict(g)
            assert 0.99 * 4.0 <= rec.epsilon <= 4.0
        assert report["worst_epsilon"] <= 4.0 and report["metrics_released"] is False

        # The model came back and is a usable model (its utility is the README's topic).
        model = tmp_path / "model.safetensors"
        client.download_model(job.job_id, model)
        assert model.stat().st_size > 0

        # Each node charged its dataset and says so.
        status = json.loads(fed.node_cli("hospital-a", ["node", "budget", "--json"]))
        (bc,) = [s for s in status if s["dataset"] == "breast_cancer"]
        spent = bc["spent"]["epsilon"]
        assert 0.99 * 4.0 <= spent <= 4.0 and [j["job_id"] for j in bc["jobs"]] == [job.job_id]

        # Restart hospital-a; a second job needing epsilon 4 of the 2 left is refused.
        fed.kill("hospital-a", signal.SIGTERM)
        fed.restart("hospital-a")
        fed.wait_for_nodes(["hospital-a"])
        second = client.submit(dp_job(wait_s=10.0))
        final2 = client.wait(second.job_id)
        assert final2.state == "failed"
        refusal = {g.node: g for g in final2.grants}["hospital-a"]
        assert refusal.outcome == "refused"
        assert "privacy budget of dataset 'breast_cancer' exceeded" in refusal.reason
        assert f"only {6.0 - spent:.4g} is left" in refusal.reason
        after = json.loads(fed.node_cli("hospital-a", ["node", "budget", "--json"]))
        (bc2,) = [s for s in after if s["dataset"] == "breast_cancer"]
        assert [j["job_id"] for j in bc2["jobs"]] == [job.job_id]
        assert math.isclose(bc2["spent"]["epsilon"], spent)
    # The node's ledger (grants with their DP plans, the spend) verifies after all this.
    fed.node_cli("hospital-a", ["node", "ledger", "verify"])  # raises if it fails
