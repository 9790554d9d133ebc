"""Record-level DP-SGD in ``train_local`` (Opacus), with real torch training.

The DP runs draw their sampling and noise seeds from ``os.urandom`` by design, so the
assertions here are statistical bounds with wide margins (or exact inequalities that
hold for every draw), never equalities on trained weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from wharf.algorithms.models import (
    init_model,
    model_to_arrays,
    set_standardization,
    weights_from_bytes,
    weights_to_bytes,
)
from wharf.algorithms.training import (
    DPSGDSettings,
    TrainSettings,
    evaluate,
    feature_moments,
    moments_to_standardization,
    poisson_sample_rate,
    torch_threads,
    train_local,
)

N_TRAIN = 400
BATCH = 32
RATE = poisson_sample_rate(N_TRAIN, BATCH)  # 1/13
EXPECTED_BATCH = RATE * N_TRAIN  # ~30.8
OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models: one thread is fastest and immune to other processes on the box.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian classes in 10-D, off-centre so standardisation matters."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, N_TRAIN + 100)
    x = rng.normal(size=(len(y), 10)) + (2 * y[:, None] - 1) * 0.8 + 3.0
    return x.astype(np.float32), y.astype(np.int64)


def _model(x: np.ndarray, kind: str, seed: int = 0, options: dict | None = None) -> nn.Module:
    model = init_model(kind, x.shape[1:], 2, options, seed=seed)
    set_standardization(model, *moments_to_standardization(*feature_moments(x)))
    return model


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().clone()


def _record_steps(model: nn.Module) -> tuple[list[tuple[int, torch.Tensor]], object]:
    """Snapshot (batch rows, parameters) at every training forward, i.e. before each step."""
    seen: list[tuple[int, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            seen.append((int(args[0].shape[0]), _flat(module)))

    return seen, model.register_forward_pre_hook(hook)


def _assert_unwrapped(model: nn.Module, keys: list[str]) -> None:
    assert list(model.state_dict()) == keys
    assert not any("_module" in k for k in model.state_dict())
    for p in model.parameters():
        assert not [a for a in OPACUS_PARAM_ATTRS if hasattr(p, a)]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._backward_pre_hooks
        leftovers = {"activations", "max_batch_len", "autograd_grad_sample_hooks"}
        assert not leftovers & set(vars(module))
    assert not model.training


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_dp_training_still_learns(blobs, kind) -> None:
    x, y = blobs
    xtr, ytr, xte, yte = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    model = _model(xtr, kind, options={"hidden": [16]} if kind == "mlp" else None)
    assert evaluate(model, xte, yte).accuracy < 0.8  # the untrained model is not already good
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=RATE)
    report = train_local(model, xtr, ytr, TrainSettings("sgd", 0.5, 3, BATCH, seed=0), dp)
    assert report.num_examples == N_TRAIN and report.epochs == 3
    assert report.steps == report.dp_steps == 3 * 13  # round(1 / q) = ceil(400 / 32) per epoch
    assert math.isfinite(report.mean_loss) and 0.0 < report.mean_loss < 0.7
    assert evaluate(model, xte, yte).accuracy >= 0.9


def test_dp_cnn_trains_and_leaves_buffers_alone() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    x = (rng.normal(size=(200, 1, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    model = _model(x, "cnn", options={"channels": [4, 8]})
    before = model_to_arrays(model)
    keys = list(model.state_dict())
    dp = DPSGDSettings(0.8, 1.0, poisson_sample_rate(200, 32))
    report = train_local(model, x, y, TrainSettings("adam", 0.01, 1, 32, seed=0), dp)
    assert report.dp_steps == 7 and math.isfinite(report.mean_loss)
    after = model_to_arrays(model)
    for key in ("standardize.mean", "standardize.std"):
        assert np.array_equal(before[key], after[key])
    for key in ("conv1.weight", "conv2.weight", "head.weight"):
        assert not np.array_equal(before[key], after[key])
        assert np.all(np.isfinite(after[key]))
    _assert_unwrapped(model, keys)


def test_clipping_bounds_every_step_and_plain_sgd_moves_more(blobs) -> None:
    x, y = blobs
    xtr, ytr = x[:N_TRAIN], y[:N_TRAIN]
    lr, clip = 0.5, 0.05
    model = _model(xtr, "mlp", options={"hidden": [16]})
    start = _flat(model)
    seen, handle = _record_steps(model)
    dp = DPSGDSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=RATE)
    report = train_local(model, xtr, ytr, TrainSettings("sgd", lr, 1, BATCH, seed=0), dp)
    handle.remove()
    assert len(seen) == report.dp_steps == 13
    snapshots = [s for _, s in seen] + [_flat(model)]
    ratios = []
    for t, (rows, _) in enumerate(seen):
        moved = float((snapshots[t + 1] - snapshots[t]).norm())
        bound = lr * clip * rows / EXPECTED_BATCH  # sum of <= clip-norm gradients / E
        assert moved <= bound * (1 + 1e-4) + 1e-7, (t, rows, moved, bound)
        ratios.append(moved / bound if rows else 0.0)
    assert max(ratios) > 0.3  # the bound is tight: clipped gradients are used, not dropped
    dp_total = float((snapshots[-1] - start).norm())
    assert dp_total <= lr * clip * sum(r for r, _ in seen) / EXPECTED_BATCH * (1 + 1e-4)

    # The same run without DP: unclipped steps, far beyond the clipped bound.
    plain = _model(xtr, "mlp", options={"hidden": [16]})
    seen_plain, handle = _record_steps(plain)
    train_local(plain, xtr, ytr, TrainSettings("sgd", lr, 1, BATCH, seed=0))
    handle.remove()
    snaps = [s for _, s in seen_plain] + [_flat(plain)]
    first = float((snaps[1] - snaps[0]).norm())
    assert first > 5 * lr * clip * seen_plain[0][0] / EXPECTED_BATCH
    assert float((snaps[-1] - start).norm()) > 5 * dp_total


def test_empty_poisson_batches_are_noisy_steps(blobs) -> None:
    x, y = blobs
    xs, ys = x[:8], y[:8]
    # q = 0.02 on 8 rows: most of the 50 batches are empty.
    for sigma in (0.0, 1.0):
        model = _model(xs, "logreg")
        seen, handle = _record_steps(model)
        dp = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=0.02)
        report = train_local(model, xs, ys, TrainSettings("sgd", 0.1, 1, 8, seed=0), dp)
        handle.remove()
        assert report.dp_steps == len(seen) == 50
        assert math.isfinite(report.mean_loss) and report.mean_loss >= 0.0
        snapshots = [s for _, s in seen] + [_flat(model)]
        empty = [t for t, (rows, _) in enumerate(seen) if rows == 0]
        assert len(empty) > 25
        for t in empty:
            moved = float((snapshots[t + 1] - snapshots[t]).norm())
            # An empty batch contributes only noise: none without it, some with it.
            assert (moved == 0.0) if sigma == 0.0 else (moved > 0.0)


def test_noise_dominates_with_large_sigma_and_is_fresh(blobs) -> None:
    x, y = blobs
    xtr, ytr = x[:N_TRAIN], y[:N_TRAIN]
    lr, clip, sigma = 0.05, 1.0, 50.0
    runs = []
    for _ in range(2):
        model = _model(xtr, "mlp", options={"hidden": [16]})
        start = _flat(model)
        seen, handle = _record_steps(model)
        dp = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=RATE)
        train_local(model, xtr, ytr, TrainSettings("sgd", lr, 1, BATCH, seed=0), dp)
        handle.remove()
        runs.append((_flat(model), seen))
    for final, seen in runs:
        # Each step adds lr * N(0, (sigma * clip / E)^2 I); T independent steps add up to
        # a norm of about lr * sigma * clip * sqrt(T * dim) / E (the chi distribution with
        # T * dim ~ 2700 degrees of freedom is within ~1.4 % of that, one standard
        # deviation). The clipped data part can shift it by at most lr * clip * sum(B) / E.
        noise = lr * sigma * clip * math.sqrt(len(seen) * start.numel()) / EXPECTED_BATCH
        signal = lr * clip * sum(rows for rows, _ in seen) / EXPECTED_BATCH
        assert signal < 0.3 * noise
        moved = float((final - start).norm())
        assert abs(moved - noise) <= 0.1 * noise + signal, (moved, noise, signal)
    # Fresh os.urandom seeds: two runs from the same start and settings differ like two
    # independent noise draws (distance about sqrt(2) * noise), not like a replay.
    assert float((runs[0][0] - runs[1][0]).norm()) > noise


def test_model_is_trained_in_place_and_unwrapped(blobs) -> None:
    x, y = blobs
    xtr, ytr = x[:N_TRAIN], y[:N_TRAIN]
    model = _model(xtr, "mlp")
    keys = list(model.state_dict())
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    dp = DPSGDSettings(1.0, 1.0, RATE)
    train_local(model, xtr, ytr, TrainSettings("sgd", 0.1, 1, BATCH, seed=0), dp)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)
    _assert_unwrapped(model, keys)

    # Export/import and evaluation behave exactly as for a model never trained with DP.
    copy = _model(xtr, "mlp", seed=5)
    arrays = weights_from_bytes(weights_to_bytes(model_to_arrays(model)))
    copy.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    assert evaluate(copy, x, y) == evaluate(model, x, y)

    # And it can be trained again, with or without DP (no "hooks added twice").
    train_local(model, xtr, ytr, TrainSettings("sgd", 0.1, 1, BATCH, seed=0), dp)
    train_local(model, xtr, ytr, TrainSettings("sgd", 0.1, 1, BATCH, seed=0))
    _assert_unwrapped(model, keys)


def test_dp_uses_no_global_rng_and_emits_no_warnings(blobs, recwarn) -> None:
    x, y = blobs
    torch_state = torch.random.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    dp = DPSGDSettings(1.0, 1.0, RATE)
    train_local(_model(x, "mlp"), x, y, TrainSettings("sgd", 0.1, 1, BATCH, seed=0), dp)
    assert torch.equal(torch_state, torch.random.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])
    assert [str(w.message) for w in recwarn] == []


def test_steps_per_epoch_rounds_instead_of_truncating() -> None:
    # int(1 / (1 / 93)) == 92: Opacus' DPDataLoader would run one step short here.
    rate = poisson_sample_rate(93, 1)
    assert int(1 / rate) == 92
    dp = DPSGDSettings(0.5, 1.0, rate)
    assert dp.steps_per_epoch == 93
    rng = np.random.default_rng(2)
    x = rng.normal(size=(93, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    report = train_local(_model(x, "logreg"), x, y, TrainSettings("sgd", 0.1, 1, 1, seed=0), dp)
    assert report.dp_steps == report.steps == 93
    assert poisson_sample_rate(10, 32) == 1.0 and poisson_sample_rate(400, 32) == 1 / 13


def test_divergence_is_reported_and_model_unwrapped() -> None:
    x = np.full((16, 3), 1e30, dtype=np.float32)
    y = np.arange(16) % 2
    model = init_model("logreg", (3,), 2, None, seed=0)
    keys = list(model.state_dict())
    dp = DPSGDSettings(1.0, 1.0, poisson_sample_rate(16, 4))
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train_local(model, x, y, TrainSettings("sgd", 1e10, 3, 4, seed=0), dp)
    model.eval()  # an aborted run leaves train mode on, as without DP
    _assert_unwrapped(model, keys)


def test_fedprox_with_dp_is_refused(blobs) -> None:
    x, y = blobs
    settings = TrainSettings("sgd", 0.1, 1, BATCH, seed=0, proximal_mu=0.1)
    with pytest.raises(ValueError, match="proximal_mu"):
        train_local(_model(x, "logreg"), x, y, settings, DPSGDSettings(1.0, 1.0, RATE))


def test_incompatible_model_is_refused_and_left_clean(blobs) -> None:
    x, y = blobs
    # BatchNorm mixes examples (and has buffers), so per-example gradients are undefined.
    model = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="per-example gradients"):
        train_local(
            model, x, y, TrainSettings("sgd", 0.1, 1, BATCH, seed=0), DPSGDSettings(1, 1, RATE)
        )
    model.eval()
    _assert_unwrapped(model, keys)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.5}, "sample_rate"),
        ({"sample_rate": math.nan}, "sample_rate"),
        ({"sample_rate": True}, "sample_rate"),
    ],
)
def test_dp_settings_validation(kwargs, match) -> None:
    base = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1}
    with pytest.raises(ValueError, match=match):
        DPSGDSettings(**{**base, **kwargs})


def test_poisson_sample_rate_validation() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        poisson_sample_rate(0, 32)
    with pytest.raises(ValueError, match=">= 1"):
        poisson_sample_rate(10, 0)
    assert DPSGDSettings(0.0, 1.0, 1.0).steps_per_epoch == 1
