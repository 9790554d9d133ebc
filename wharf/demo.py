"""``wharf demo``: three hospitals train one model without pooling their data.

Creates a CA and certificates in a temporary directory, starts a coordinator
and three node processes on loopback with mTLS, splits the Wisconsin
breast-cancer diagnostic data across the hospitals non-IID (each hospital's
mix of malignant and benign cases differs), holds out a test set, submits an
MLP job, follows it, and compares the federated model's test accuracy with a
model trained centrally on the pooled training data with the same settings.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wharf.console import out

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
# Share of each class's training rows held by each hospital (non-IID label mix).
MALIGNANT_SHARES = (0.60, 0.25, 0.15)
BENIGN_SHARES = (0.15, 0.35, 0.50)
LABEL = "diagnosis"


@dataclass(frozen=True)
class DemoSplit:
    parts: dict[str, pd.DataFrame]
    train: pd.DataFrame
    test: pd.DataFrame


def split_non_iid(frame: pd.DataFrame, seed: int = 7, test_fraction: float = 0.2) -> DemoSplit:
    """Stratified hold-out, then per-class shares that differ by hospital."""
    rng = np.random.default_rng(seed)  # data shuffling, not secret material
    test_idx: list[int] = []
    parts: dict[str, list[int]] = {h: [] for h in HOSPITALS}
    for label, shares in ((0, MALIGNANT_SHARES), (1, BENIGN_SHARES)):
        idx = rng.permutation(np.flatnonzero(frame[LABEL].to_numpy() == label))
        n_test = round(len(idx) * test_fraction)
        test_idx += idx[:n_test].tolist()
        rest = idx[n_test:]
        cuts = np.cumsum([round(s * len(rest)) for s in shares[:-1]])
        for h, chunk in zip(HOSPITALS, np.split(rest, cuts), strict=True):
            parts[h] += chunk.tolist()
    frames = {h: frame.iloc[sorted(ix)].reset_index(drop=True) for h, ix in parts.items()}
    train = pd.concat(frames.values(), ignore_index=True)
    return DemoSplit(frames, train, frame.iloc[sorted(test_idx)].reset_index(drop=True))


def job_spec(rounds: int, secure: bool) -> dict[str, object]:
    return {
        "name": "breast-cancer-mlp",
        "purpose": "medical-research",
        "description": "Demo: malignant vs benign from FNA cell-nucleus features",
        "data": {"dataset": "breast_cancer"},
        "model": {"kind": "mlp", "num_classes": 2, "hidden": [32, 16]},
        "training": {"optimizer": "adam", "lr": 0.005, "epochs": 1, "batch_size": 16, "seed": 0},
        "federation": {
            "rounds": rounds,
            "min_nodes": 3,
            "strategy": "fedavg",
            "secure": secure,
            "round_timeout_s": 120.0,
        },
    }


def central_accuracy(split: DemoSplit, spec: dict[str, object], rounds: int) -> float:
    """The same model and settings trained on the pooled training data."""
    from wharf.algorithms import models, training

    features = [c for c in split.train.columns if c != LABEL]
    x = split.train[features].to_numpy(np.float32)
    y = split.train[LABEL].to_numpy(np.int64)
    t = spec["training"]
    assert isinstance(t, dict)
    net = models.init_model("mlp", (x.shape[1],), 2, {"hidden": [32, 16]}, int(t["seed"]))
    total, total_sq, count = training.feature_moments(x)
    models.set_standardization(net, *training.moments_to_standardization(total, total_sq, count))
    settings = training.TrainSettings(
        optimizer="adam",
        lr=float(t["lr"]),
        epochs=int(t["epochs"]) * rounds,
        batch_size=int(t["batch_size"]),
        seed=int(t["seed"]),
    )
    training.train_local(net, x, y, settings)
    return test_accuracy(net, split)


def test_accuracy(net: object, split: DemoSplit) -> float:
    from wharf.algorithms import training

    features = [c for c in split.test.columns if c != LABEL]
    report = training.evaluate(
        net,  # type: ignore[arg-type]
        split.test[features].to_numpy(np.float32),
        split.test[LABEL].to_numpy(np.int64),
    )
    return float(report.accuracy)


def federated_accuracy(model_path: Path, split: DemoSplit) -> float:
    from wharf.algorithms import models

    weights = models.weights_from_bytes(model_path.read_bytes())
    n_features = len([c for c in split.test.columns if c != LABEL])
    net = models.build_model("mlp", (n_features,), 2, {"hidden": [32, 16]})
    models.arrays_to_model(net, weights)
    return test_accuracy(net, split)


def run_demo(rounds: int = 20, secure: bool = True, keep: bool = False) -> int:
    from wharf import spec as spec_mod
    from wharf.datasets import load_breast_cancer
    from wharf.job_cli import follow
    from wharf.localfed import LocalFederation

    root = Path(tempfile.mkdtemp(prefix="wharf-demo-"))
    out.print(f"[bold]Wharf demo[/bold] — working in {root}")
    frame = load_breast_cancer()
    split = split_non_iid(frame)
    spec_dict = job_spec(rounds, secure)
    code = 1
    fed = LocalFederation(root)
    try:
        out.print("• deployment CA and certificates (coordinator, 3 hospitals, developer alice)")
        fed.start_coordinator()
        out.print(f"• coordinator on {fed.address} (mTLS)")
        for h in HOSPITALS:
            part = split.parts[h]
            path = root / "data" / f"{h}.csv"
            path.parent.mkdir(exist_ok=True)
            part.to_csv(path, index=False)
            fed.register_dataset(h, "breast_cancer", path, LABEL)
            fed.start_node(h)
            mal = int((part[LABEL] == 0).sum())
            out.print(f"• {h}: {len(part)} rows ({mal} malignant, {len(part) - mal} benign)")
        out.print(f"• held-out test set: {len(split.test)} rows")
        fed.wait_for_nodes(list(HOSPITALS))
        spec = spec_mod.from_dict(spec_dict)
        with fed.client("alice") as client:
            info = client.submit(spec)
            out.print(
                f"• submitted job {info.job_id} (secure aggregation: {'on' if secure else 'OFF'})"
            )
            final = follow(client, info.job_id, info.rounds_total)
            if final.state != "completed":
                out.print(f"[red]job {final.state}: {final.reason}[/red]")
                return 1
            model_path = root / "model.safetensors"
            client.download_model(info.job_id, model_path)
        fed_acc = federated_accuracy(model_path, split)
        central_acc = central_accuracy(split, spec_dict, rounds)
        gap = (central_acc - fed_acc) * 100
        out.print()
        out.print(f"  federated model test accuracy : [bold]{fed_acc * 100:.2f} %[/bold]")
        out.print(f"  central model test accuracy   : [bold]{central_acc * 100:.2f} %[/bold]")
        verdict = (
            "[green]within 2 points[/green]"
            if abs(gap) <= 2
            else "[red]more than 2 points apart[/red]"
        )
        out.print(f"  difference                    : {gap:+.2f} points ({verdict})")
        code = 0 if abs(gap) <= 2 else 1
    except RuntimeError as exc:
        out.print(f"[red]demo failed: {exc}[/red]")
    finally:
        fed.stop_all()
        if keep:
            out.print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return code
