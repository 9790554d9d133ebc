"""Server strategies: averaging math, adaptive optimisers, and a real FedAvg simulation."""

from __future__ import annotations

import numpy as np
import pytest

from wharf.algorithms.models import (
    arrays_to_model,
    init_model,
    model_to_arrays,
    set_standardization,
    weights_from_bytes,
    weights_to_bytes,
)
from wharf.algorithms.strategies import (
    STRATEGIES,
    average_from_sum,
    make_strategy,
    weighted_average,
)
from wharf.algorithms.training import (
    TrainSettings,
    evaluate,
    feature_moments,
    moments_to_standardization,
    train_local,
)
from wharf.datasets import load_breast_cancer


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_weighted_average_math() -> None:
    deltas = [
        ({"a": _f32(1, 2), "b": _f32(10)}, 1),
        ({"a": _f32(3, 6), "b": _f32(-10)}, 3),
    ]
    avg = weighted_average(deltas)
    assert list(avg) == ["a", "b"]
    np.testing.assert_allclose(avg["a"], [2.5, 5.0])
    np.testing.assert_allclose(avg["b"], [-5.0])
    assert avg["a"].dtype == np.float32
    summed = {"a": _f32(1 + 9, 2 + 18), "b": _f32(10 - 30)}
    secure = average_from_sum(summed, 4)
    assert all(np.array_equal(secure[k], avg[k]) for k in avg)


@pytest.mark.parametrize(
    ("deltas", "match"),
    [
        ([], "zero deltas"),
        ([({"a": _f32(1)}, 0)], "positive int"),
        ([({"a": _f32(1)}, True)], "positive int"),
        ([({"a": _f32(1)}, 1), ({"b": _f32(1)}, 1)], "missing \\['a'\\]"),
        ([({"a": _f32(1)}, 1), ({"a": _f32(1, 2)}, 1)], "'a' has shape"),
        ([({"a": _f32(1)}, 1), ({"a": _f32(np.nan)}, 1)], "'a' contains NaN"),
    ],
)
def test_weighted_average_validation(deltas, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(deltas)


def test_average_from_sum_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        average_from_sum({"a": _f32(1)}, 0)
    with pytest.raises(ValueError, match="'a'"):
        average_from_sum({"a": _f32(np.inf)}, 2)


def _weights() -> dict[str, np.ndarray]:
    return {
        "head.weight": _f32(1.0, -2.0, 0.5),
        "standardize.mean": _f32(3.0, 4.0, 5.0),
        "standardize.std": _f32(1.0, 2.0, 3.0),
    }


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_update_and_frozen_buffers(name: str) -> None:
    strategy = make_strategy(name, {"server_lr": 0.5})
    weights = _weights()
    delta = {k: np.ones_like(v) for k, v in weights.items()}  # even a bogus buffer delta
    new, state = strategy.apply(weights, delta, {}, 0)
    assert state == {}
    np.testing.assert_allclose(new["head.weight"], [1.5, -1.5, 1.0])
    for key in ("standardize.mean", "standardize.std"):
        assert np.array_equal(new[key], weights[key])
    assert np.array_equal(weights["head.weight"], _f32(1.0, -2.0, 0.5))  # input not mutated


def test_extra_frozen_names_and_patterns() -> None:
    strategy = make_strategy("fedavg", {}, frozen={"head.*"})
    weights = _weights()
    new, _ = strategy.apply(weights, {k: np.ones_like(v) for k, v in weights.items()}, {}, 0)
    assert all(np.array_equal(new[k], weights[k]) for k in weights)


def test_fedprox_carries_mu() -> None:
    strategy = make_strategy("fedprox", {"mu": 0.1})
    assert getattr(strategy, "proximal_mu", None) == 0.1


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_first_step_matches_paper(name: str) -> None:
    eta, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
    options = {"eta": eta, "beta1": beta1, "tau": tau}
    if name != "fedadagrad":
        options["beta2"] = beta2
    strategy = make_strategy(name, options)
    weights = _weights()
    delta = {k: np.zeros_like(v) for k, v in weights.items()}
    delta["head.weight"] = _f32(0.2, -0.4, 0.0)
    new, state = strategy.apply(weights, delta, {}, 0)
    d = delta["head.weight"].astype(np.float64)
    v0 = tau**2
    m = (1 - beta1) * d
    v = {
        "fedadam": beta2 * v0 + (1 - beta2) * d**2,
        "fedyogi": v0 - (1 - beta2) * d**2 * np.sign(v0 - d**2),
        "fedadagrad": v0 + d**2,
    }[name]
    expected = weights["head.weight"] + eta * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(new["head.weight"], expected, rtol=1e-6)
    assert sorted(state) == ["m/head.weight", "v/head.weight"]  # no state for frozen buffers
    assert all(a.dtype == np.float32 for a in state.values())


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_descends_toy_quadratic_with_state_through_safetensors(name: str) -> None:
    """Clients minimise ||w - target||^2; their delta is one local gradient step."""
    target = _f32(1.0, -3.0, 2.0, 0.5)
    weights = {"w": np.zeros(4, np.float32), "standardize.mean": _f32(7.0)}
    # Adagrad's accumulated v shrinks its steps over time, so it needs a larger eta.
    strategy = make_strategy(name, {"eta": 0.5 if name == "fedadagrad" else 0.1})
    stored = weights_to_bytes({})
    start = float(np.linalg.norm(weights["w"] - target))
    for round_index in range(60):
        delta = {"w": 0.1 * (target - weights["w"]), "standardize.mean": _f32(1.0)}
        new, state = strategy.apply(weights, delta, weights_from_bytes(stored), round_index)
        if round_index == 0:  # every coordinate moves toward its target
            step = new["w"] - weights["w"]
            assert np.all(np.sign(step) == np.sign(target))
        stored = weights_to_bytes(state)  # as a coordinator would persist it
        weights = new
    end = float(np.linalg.norm(weights["w"] - target))
    assert end < 0.2 * start
    assert weights["standardize.mean"][0] == 7.0


def test_adaptive_state_is_checked() -> None:
    strategy = make_strategy("fedadam", {})
    weights = {"w": _f32(0, 0)}
    delta = {"w": _f32(1, 1)}
    _, state = strategy.apply(weights, delta, {}, 0)
    with pytest.raises(ValueError, match="state does not match"):
        strategy.apply(weights, delta, {"m/w": state["m/w"]}, 1)
    with pytest.raises(ValueError, match="wrong shape"):
        strategy.apply(weights, delta, {"m/w": _f32(0), "v/w": _f32(0)}, 1)
    with pytest.raises(ValueError, match="keeps no state"):
        make_strategy("fedavg", {}).apply(weights, delta, state, 1)


def test_apply_validates_delta() -> None:
    strategy = make_strategy("fedyogi", {})
    with pytest.raises(ValueError, match="missing"):
        strategy.apply({"w": _f32(0)}, {}, {}, 0)
    with pytest.raises(ValueError, match="NaN"):
        strategy.apply({"w": _f32(0)}, {"w": _f32(np.nan)}, {}, 0)
    with pytest.raises(ValueError, match="round_index"):
        strategy.apply({"w": _f32(0)}, {"w": _f32(0)}, {}, -1)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fedsgd", {}, "unknown strategy"),
        ("fedavg", {"lr": 1.0}, "unknown fedavg option"),
        ("fedadagrad", {"beta2": 0.9}, "unknown fedadagrad option"),
        ("fedadam", {"beta1": 1.0}, "beta1"),
        ("fedadam", {"eta": -1.0}, "eta"),
        ("fedyogi", {"tau": 0.0}, "tau"),
        ("fedavg", {"server_lr": "1"}, "number"),
        ("fedprox", {"mu": -1.0}, "mu"),
    ],
)
def test_make_strategy_rejects(name, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_strategy(name, options)


def test_all_listed_strategies_build() -> None:
    assert STRATEGIES == ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
    assert [make_strategy(n, {}).name for n in STRATEGIES] == list(STRATEGIES)


def test_three_client_fedavg_matches_central_training_on_breast_cancer() -> None:
    """Non-IID label split; standardisation from summed moments; real local training."""
    frame = load_breast_cancer()
    x = frame.drop(columns="diagnosis").to_numpy(np.float32)
    y = frame["diagnosis"].to_numpy(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    test, train = perm[:114], perm[114:]
    malignant, benign = train[y[train] == 0], train[y[train] == 1]
    clients = [  # ~14 %, ~81 %, ~85 % benign
        np.concatenate([malignant[:120], benign[:20]]),
        np.concatenate([malignant[120:150], benign[20:150]]),
        np.concatenate([malignant[150:], benign[150:]]),
    ]
    assert sorted(np.concatenate(clients).tolist()) == sorted(train.tolist())

    central = init_model("logreg", (30,), 2, None, seed=0)
    set_standardization(central, *moments_to_standardization(*feature_moments(x[train])))
    train_local(central, x[train], y[train], TrainSettings("sgd", 0.05, 30, 32, seed=0))
    central_acc = evaluate(central, x[test], y[test]).accuracy

    moments = [feature_moments(x[c]) for c in clients]  # each node computes its own
    mean, std = moments_to_standardization(
        sum(m[0] for m in moments), sum(m[1] for m in moments), sum(m[2] for m in moments)
    )
    model = init_model("logreg", (30,), 2, None, seed=0)
    set_standardization(model, mean, std)
    global_weights = model_to_arrays(model)
    strategy = make_strategy("fedavg", {})
    state: dict[str, np.ndarray] = {}
    for round_index in range(15):
        deltas = []
        for i, idx in enumerate(clients):
            local = arrays_to_model(init_model("logreg", (30,), 2, None, seed=0), global_weights)
            settings = TrainSettings("sgd", 0.05, 2, 32, seed=1000 * round_index + i)
            train_local(local, x[idx], y[idx], settings)
            trained = model_to_arrays(local)
            deltas.append(({k: trained[k] - global_weights[k] for k in trained}, len(idx)))
        global_weights, state = strategy.apply(
            global_weights, weighted_average(deltas), state, round_index
        )
    arrays_to_model(model, global_weights)
    fed_acc = evaluate(model, x[test], y[test]).accuracy
    print(f"breast cancer logreg: central {central_acc:.3f}, 3-client FedAvg {fed_acc:.3f}")
    assert central_acc > 0.93
    assert fed_acc >= central_acc - 0.04
