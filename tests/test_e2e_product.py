"""Model products end to end: a real federation trains a job whose spec consents to
clear-text valuation; the exchange operator packages it with the real ``wharf product
package`` command (dossier and model from the coordinator, contribution scores from
the operator's validation data, revenue split); the product verifies offline after
every process is gone, and a tampered copy does not. A second job values the nodes in
secure mode: secure aggregation with participant-level DP, leave-one-out scores from
noised coalition sums only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fedutil import HOSPITALS, spec, start_federation

from wharf import spec as spec_mod
from wharf.algorithms.privacy.accounting import Guarantee
from wharf.datasets import scale_to_published_ranges

pytestmark = pytest.mark.slow


def wharf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wharf.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def shuffle_labels(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """hospital-c holds noise: its labels are shuffled (its features are real)."""
    if name == "hospital-c":
        rng = np.random.default_rng(0)  # test data, not secret material
        frame["diagnosis"] = rng.permutation(frame["diagnosis"].to_numpy())
    return frame


def test_package_verify_offline_and_tamper(tmp_path: Path) -> None:
    fed, test = start_federation(tmp_path, edit=shuffle_labels)
    raw = spec(4, secure=False, min_nodes=3)
    raw["valuation"] = {"mode": "clear"}
    validation = tmp_path / "validation.csv"
    test.to_csv(validation, index=False)
    product = tmp_path / "cancer-model.wharf"
    with fed, fed.client() as client:
        job = client.submit(spec_mod.from_dict(raw))
        final = client.wait(job.job_id)
        assert final.state == "completed", final.reason
        ca = str(fed.ca_pem)
        common = ["--coordinator", fed.address, "--ca", ca]
        # A developer may not package (operators only).
        dev_cert, dev_key = fed.identity("developer", "alice")
        denied = wharf(
            "product", "package", job.job_id, "-o", str(tmp_path / "x.wharf"),
            "--licence", "research only", "--price", "100", "--currency", "EUR",
            "--cert", str(dev_cert), "--key", str(dev_key), *common,
            cwd=tmp_path,
        )  # fmt: skip
        assert denied.returncode != 0 and not (tmp_path / "x.wharf").exists()
        assert "PERMISSION_DENIED" in denied.stderr + denied.stdout or "operator" in (
            denied.stderr + denied.stdout
        )
        cert, key = fed.identity("operator", "exchange")
        made = wharf(
            "product", "package", job.job_id, "-o", str(product),
            "--licence", "Non-exclusive research licence, 12 months",
            "--price", "250000", "--currency", "EUR",
            "--validation", str(validation), "--label", "diagnosis",
            "--cert", str(cert), "--key", str(key), *common,
            cwd=tmp_path,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        assert "clear-text exact per-round Shapley" in made.stdout
    # Every process is gone: verification needs only the file and the CA certificate.
    ok = wharf("product", "verify", str(product), "--ca", ca, "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    with zipfile.ZipFile(product) as z:
        passport = json.loads(z.read("passport.json"))
    scores = passport["contribution"]["scores"]
    assert set(scores) == set(HOSPITALS)
    # The node holding noise is worth less than either honest node.
    assert scores["hospital-c"] < min(scores["hospital-a"], scores["hospital-b"]), scores
    shares = passport["revenue"]["shares"]
    assert sum(shares.values()) == 250000
    assert shares["hospital-c"] < min(shares["hospital-a"], shares["hospital-b"])
    assert set(passport["participants"]) == set(HOSPITALS)

    card = tmp_path / "card.md"
    shown = wharf("product", "show", str(product), "--markdown", str(card), cwd=tmp_path)
    assert shown.returncode == 0 and job.job_id in shown.stdout
    assert job.job_id in card.read_text()

    # One byte of the weights changed: verification fails and names the part.
    tampered = tmp_path / "tampered.wharf"
    with zipfile.ZipFile(product) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = bytearray(src.read(info))
            if info.filename == "model.safetensors":
                data[-1] ^= 0x01
            dst.writestr(info, bytes(data))
    bad = wharf("product", "verify", str(tampered), "--ca", ca, cwd=tmp_path)
    assert bad.returncode == 1
    assert "weights" in bad.stdout + bad.stderr

    # A dishonest operator improves a round's metric and signs again: the coordinator
    # signed every round's metrics into its ledger, so the edit is still caught.
    from wharf.identity import Identity, canonical_json
    from wharf.product import sign_passport

    operator = Identity.load(cert, key, fed.ca_pem)
    with zipfile.ZipFile(product) as src:
        files = {i.filename: src.read(i) for i in src.infolist()}
    edited = json.loads(files["passport.json"])
    edited["training"]["rounds"][0]["metrics"]["global_accuracy"] = 0.999
    files["passport.json"] = canonical_json(edited)
    files["passport.sig.json"] = canonical_json(sign_passport(edited, operator))
    resigned = tmp_path / "resigned.wharf"
    with zipfile.ZipFile(resigned, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in files.items():
            dst.writestr(name, data)
    caught = wharf("product", "verify", str(resigned), "--ca", ca, cwd=tmp_path)
    assert caught.returncode == 1
    assert "metrics differ from the coordinator's signed round_finished" in (
        caught.stdout + caught.stderr
    )


def scaled_and_shuffled(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """DP jobs use published-range scaling (no standardisation round); hospital-c's
    labels are shuffled as above."""
    return shuffle_labels(name, scale_to_published_ranges(frame))


def test_secure_mode_contribution_from_noised_coalition_sums(tmp_path: Path) -> None:
    fed, test = start_federation(tmp_path, edit=scaled_and_shuffled)
    raw = spec(4, secure=True, min_nodes=3, timeout=90.0, lr=0.05)
    raw["model"] = {"kind": "mlp", "num_classes": 2, "hidden": [16], "standardize": False}
    raw["federation"]["max_nodes"] = 3  # type: ignore[index]
    # Little noise (a large epsilon, reported): this test is about the pipeline; the
    # utility at useful epsilons is measured in benchmarks/contribution_modes.py.
    raw["privacy"] = {
        "participant_level": {"noise_multiplier": 0.05, "delta": 1e-5, "clip": 1.0},
    }
    raw["valuation"] = {"mode": "secure"}
    validation = tmp_path / "validation.csv"
    scale_to_published_ranges(test).to_csv(validation, index=False)
    product = tmp_path / "secure.wharf"
    with fed, fed.client() as client:
        job = client.submit(spec_mod.from_dict(raw))
        final = client.wait(job.job_id)
        assert final.state == "completed", final.reason
        for r in final.rounds:
            assert sorted(r.nodes) == list(HOSPITALS)
        # Every node paid for 3 releases a round (the training sum and two leave-one-out
        # sums it is in): 4 rounds x max_nodes 3 = 12 composed releases.
        part = Guarantee.from_dict(json.loads(final.privacy_json)["participant_level"])
        assert part.mechanism["rounds"] == 12
        cert, key = fed.identity("operator", "exchange")
        made = wharf(
            "product", "package", job.job_id, "-o", str(product),
            "--licence", "research only", "--price", "90000", "--currency", "EUR",
            "--validation", str(validation), "--label", "diagnosis",
            "--cert", str(cert), "--key", str(key),
            "--coordinator", fed.address, "--ca", str(fed.ca_pem),
            cwd=tmp_path,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        assert "secure leave-one-out" in made.stdout
    ok = wharf("product", "verify", str(product), "--ca", str(fed.ca_pem), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with zipfile.ZipFile(product) as z:
        passport = json.loads(z.read("passport.json"))
    assert passport["contribution"]["method"].startswith("secure leave-one-out")
    scores = passport["contribution"]["scores"]
    assert set(scores) == set(HOSPITALS)
    assert scores["hospital-c"] < min(scores["hospital-a"], scores["hospital-b"]), scores
    shares = passport["revenue"]["shares"]
    assert shares["hospital-c"] < min(shares["hospital-a"], shares["hospital-b"])

    # A dishonest operator states the guarantee of the same noise over the job's 4
    # rounds only (a smaller ε that recomputes fine) and signs again: the holders'
    # grants carry the 12-release guarantee, so verification names the privacy part.
    from wharf.identity import Identity, canonical_json
    from wharf.product import sign_passport

    stated = Guarantee.from_dict(passport["privacy"]["participant_level"])
    fewer = Guarantee.for_participant_level(stated.skellam_plan(), 4, stated.delta)
    assert fewer.epsilon < stated.epsilon
    with zipfile.ZipFile(product) as src:
        files = {i.filename: src.read(i) for i in src.infolist()}
    edited = json.loads(files["passport.json"])
    edited["privacy"]["participant_level"] = fewer.to_dict()
    operator = Identity.load(cert, key, fed.ca_pem)
    files["passport.json"] = canonical_json(edited)
    files["passport.sig.json"] = canonical_json(sign_passport(edited, operator))
    resigned = tmp_path / "fewer-releases.wharf"
    with zipfile.ZipFile(resigned, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in files.items():
            dst.writestr(name, data)
    caught = wharf("product", "verify", str(resigned), "--ca", str(fed.ca_pem), cwd=tmp_path)
    assert caught.returncode == 1
    assert "participant-level guarantee is not the one hospital-a signed" in (
        caught.stdout + caught.stderr
    )
