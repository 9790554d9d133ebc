"""Helpers for end-to-end tests: a real local federation on loopback with mTLS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from wharf.datasets import load_breast_cancer
from wharf.demo import split_non_iid
from wharf.localfed import LocalFederation

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def start_federation(
    root: Path,
    nodes: tuple[str, ...] = HOSPITALS,
    *,
    node_options: dict[str, dict[str, str]] | None = None,
    edit: Callable[[str, pd.DataFrame], pd.DataFrame] | None = None,
    policies: dict[str, str] | None = None,
    register_extra: dict[str, tuple[str, ...]] | None = None,
) -> tuple[LocalFederation, pd.DataFrame]:
    """Coordinator + node processes, each holding a non-IID share of breast cancer."""
    fed = LocalFederation(
        root, node_options=dict(node_options or {}), policies=dict(policies or {})
    )
    fed.start_coordinator()
    split = split_non_iid(load_breast_cancer())
    for name in nodes:
        path = root / "data" / f"{name}.csv"
        path.parent.mkdir(exist_ok=True)
        part = split.parts[name] if edit is None else edit(name, split.parts[name].copy())
        part.to_csv(path, index=False)
        fed.register_dataset(
            name, "breast_cancer", path, "diagnosis", extra=(register_extra or {}).get(name, ())
        )
        fed.start_node(name)
    fed.wait_for_nodes(list(nodes))
    return fed, split.test


def spec(
    rounds: int,
    *,
    secure: bool = True,
    min_nodes: int = 3,
    epochs: int = 1,
    timeout: float = 60.0,
    retries: int = 2,
    hidden: object = None,
    **training: object,
) -> dict[str, object]:
    train = {"optimizer": "adam", "lr": 0.005, "epochs": epochs, "batch_size": 16, "seed": 0}
    train.update(training)
    return {
        "name": "e2e",
        "purpose": "medical-research",
        "data": {"dataset": "breast_cancer"},
        "model": {"kind": "mlp", "num_classes": 2, "hidden": [16]},
        "training": train,
        "federation": {
            "rounds": rounds,
            "min_nodes": min_nodes,
            "secure": secure,
            "round_timeout_s": timeout,
            "max_round_retries": retries,
            "wait_for_nodes_s": 60.0,
        },
    }


def wait_until(pred: Callable[[], bool], timeout: float, what: str, fed: LocalFederation) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            logs = "\n".join(f"--- {n}\n{fed.tail(n)}" for n in fed.procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


def model_accuracy(model_path: Path, test: pd.DataFrame, hidden: list[int]) -> float:
    from wharf.algorithms import models, training

    feats = [c for c in test.columns if c != "diagnosis"]
    net = models.build_model("mlp", (len(feats),), 2, {"hidden": hidden})
    models.arrays_to_model(net, models.weights_from_bytes(model_path.read_bytes()))
    rep = training.evaluate(
        net, test[feats].to_numpy(np.float32), test["diagnosis"].to_numpy(np.int64)
    )
    return float(rep.accuracy)
