"""Local training, evaluation and feature moments with real torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wharf.algorithms.models import init_model, model_to_arrays, set_standardization
from wharf.algorithms.training import (
    EvalReport,
    TrainSettings,
    evaluate,
    feature_moments,
    moments_to_standardization,
    torch_threads,
    train_local,
)
from wharf.datasets import load_breast_cancer


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray]:
    frame = load_breast_cancer()
    return (
        frame.drop(columns="diagnosis").to_numpy(np.float32),
        frame["diagnosis"].to_numpy(np.int64),
    )


def _model(x: np.ndarray, kind: str = "mlp", seed: int = 0) -> torch.nn.Module:
    model = init_model(kind, (x.shape[1],), 2, None, seed=seed)
    set_standardization(model, *moments_to_standardization(*feature_moments(x)))
    return model


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def test_report_counts(cancer) -> None:
    x, y = cancer
    report = train_local(_model(x), x[:100], y[:100], TrainSettings("sgd", 0.05, 3, 32, seed=0))
    assert report.num_examples == 100
    assert report.epochs == 3
    assert report.steps == 3 * 4  # ceil(100 / 32) batches per epoch
    assert 0.0 < report.mean_loss < 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_is_deterministic_given_seed(cancer, optimizer) -> None:
    x, y = cancer
    settings = TrainSettings(optimizer, 0.01, 2, 16, seed=7, weight_decay=1e-4)
    runs = []
    for seed in (7, 7, 8):
        model = _model(x)
        report = train_local(model, x, y, TrainSettings(**{**settings.__dict__, "seed": seed}))
        runs.append((model_to_arrays(model), report))
    (a, ra), (b, rb), (c, _) = runs
    assert ra == rb
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)  # shuffling follows the seed


def test_training_does_not_use_global_rng(cancer) -> None:
    x, y = cancer
    state = torch.random.get_rng_state()
    train_local(_model(x), x[:64], y[:64], TrainSettings("sgd", 0.05, 1, 16, seed=0))
    assert torch.equal(state, torch.random.get_rng_state())


def test_fedprox_large_mu_stays_closer_to_start(cancer) -> None:
    x, y = cancer
    malignant_heavy = np.concatenate([np.flatnonzero(y == 0)[:150], np.flatnonzero(y == 1)[:10]])
    xs, ys = x[malignant_heavy], y[malignant_heavy]
    start = model_to_arrays(_model(x))
    moved = {}
    for mu in (0.0, 1.0, 10.0):
        model = _model(x)
        train_local(model, xs, ys, TrainSettings("sgd", 0.05, 5, 16, seed=0, proximal_mu=mu))
        moved[mu] = _distance(model_to_arrays(model), start)
    assert moved[10.0] < moved[1.0] < moved[0.0]
    assert moved[10.0] < 0.5 * moved[0.0]


def test_standardize_buffers_are_not_trained(cancer) -> None:
    x, y = cancer
    model = _model(x)
    before = model_to_arrays(model)
    train_local(model, x, y, TrainSettings("adam", 0.01, 1, 64, seed=0, weight_decay=0.1))
    after = model_to_arrays(model)
    for key in ("standardize.mean", "standardize.std"):
        assert np.array_equal(before[key], after[key])
    assert not np.array_equal(before["head.weight"], after["head.weight"])


def test_evaluate_matches_manual_computation(cancer) -> None:
    x, y = cancer
    model = _model(x, "logreg")
    report = evaluate(model, x, y, batch_size=100)
    with torch.no_grad():
        logits = model(torch.tensor(x))
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y), reduction="sum")
    assert report.num_examples == len(y)
    assert report.correct == int((logits.argmax(1) == torch.tensor(y)).sum())
    assert report.loss_sum == pytest.approx(float(expected_loss), rel=1e-5)
    assert report.accuracy == report.correct / len(y)
    assert report.mean_loss == pytest.approx(report.loss_sum / len(y))


def test_eval_reports_add_up(cancer) -> None:
    x, y = cancer
    model = _model(x)
    whole = evaluate(model, x, y)
    parts = evaluate(model, x[:200], y[:200]) + evaluate(model, x[200:], y[200:])
    assert parts.num_examples == whole.num_examples and parts.correct == whole.correct
    assert parts.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)
    empty = evaluate(model, x[:0], y[:0])
    assert empty == EvalReport(0, 0.0, 0) and math.isnan(empty.accuracy)


def test_moments_add_across_parties(cancer) -> None:
    x, _ = cancer
    parts = [feature_moments(x[:100]), feature_moments(x[100:350]), feature_moments(x[350:])]
    total = sum(p[0] for p in parts)
    total_sq = sum(p[1] for p in parts)
    count = sum(p[2] for p in parts)
    assert count == len(x)
    mean, std = moments_to_standardization(total, total_sq, count)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, x64.std(axis=0), rtol=1e-6)
    s, sq, n = feature_moments(np.zeros((3, 2, 2)))
    assert s.shape == sq.shape == (2, 2) and s.dtype == np.float64 and n == 3
    with pytest.raises(ValueError, match="count"):
        moments_to_standardization(s, sq, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"proximal_mu": -0.1}, "proximal_mu"),
    ],
)
def test_settings_validation(kwargs, match) -> None:
    base = {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 8, "seed": 0}
    with pytest.raises(ValueError, match=match):
        TrainSettings(**{**base, **kwargs})


def test_bad_data_is_refused(cancer) -> None:
    x, y = cancer
    settings = TrainSettings("sgd", 0.1, 1, 8, seed=0)
    with pytest.raises(ValueError, match="same number"):
        train_local(_model(x), x[:10], y[:9], settings)
    with pytest.raises(ValueError, match="zero examples"):
        train_local(_model(x), x[:0], y[:0], settings)
    with pytest.raises(ValueError, match="out of range"):
        train_local(_model(x), x[:10], np.full(10, 2), settings)
    with pytest.raises(ValueError, match=">= 0"):
        evaluate(_model(x), x[:10], np.full(10, -1))


def test_divergence_is_reported() -> None:
    x = np.full((16, 3), 1e30, dtype=np.float32)
    y = np.arange(16) % 2
    model = init_model("logreg", (3,), 2, None, seed=0)
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train_local(model, x, y, TrainSettings("sgd", 1e10, 3, 4, seed=0))


def test_torch_threads_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
