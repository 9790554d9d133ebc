"""Model zoo, standardisation and weight formats, with real torch training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wharf.algorithms.models import (
    MODEL_KINDS,
    STANDARDIZE_KEYS,
    arrays_to_model,
    build_model,
    flatten,
    init_model,
    model_to_arrays,
    set_standardization,
    unflatten,
    weights_from_bytes,
    weights_to_bytes,
)
from wharf.algorithms.training import (
    TrainSettings,
    evaluate,
    feature_moments,
    moments_to_standardization,
    train_local,
)
from wharf.datasets import load_breast_cancer, load_digits


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    frame = load_digits()
    x = frame.drop(columns="digit").to_numpy(np.float32)
    return x, frame["digit"].to_numpy(np.int64)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("logreg", (30,)),
        ("mlp", (30,)),
        ("logreg", (1, 8, 8)),
        ("cnn", (64,)),
        ("cnn", (1, 8, 8)),
        ("cnn", (28, 28)),
        ("cnn", (3, 28, 28)),
        ("cnn", (1, 5, 7)),
    ],
)
def test_forward_shapes(kind: str, shape: tuple[int, ...]) -> None:
    model = init_model(kind, shape, 10, None, seed=0)
    assert model(torch.randn(4, *shape)).shape == (4, 10)
    names = model_to_arrays(model)
    assert STANDARDIZE_KEYS[0] in names and STANDARDIZE_KEYS[1] in names
    assert names["standardize.mean"].shape == shape


def test_mlp_hidden_option() -> None:
    model = build_model("mlp", (30,), 2, {"hidden": [8]})
    shapes = {k: v.shape for k, v in model_to_arrays(model).items()}
    assert shapes["fc1.weight"] == (8, 30)
    assert shapes["head.weight"] == (2, 8)
    assert "fc2.weight" not in shapes


@pytest.mark.parametrize(
    ("kind", "shape", "classes", "options", "match"),
    [
        ("resnet", (30,), 2, None, "unknown model kind"),
        ("mlp", (30,), 2, {"hiden": [4]}, "unknown mlp option"),
        ("mlp", (30,), 2, {"hidden": [0]}, "hidden"),
        ("mlp", (30,), 2, {"hidden": "64"}, "hidden"),
        ("logreg", (30,), 2, {"hidden": [4]}, "unknown logreg option"),
        ("cnn", (30,), 2, None, "perfect square"),
        ("cnn", (1, 1, 8), 2, None, "at least 2x2"),
        ("cnn", (64,), 2, {"channels": [8]}, "channels"),
        ("logreg", (), 2, None, "input_shape"),
        ("logreg", (0,), 2, None, "input_shape"),
        ("logreg", (30,), 1, None, "num_classes"),
    ],
)
def test_bad_arguments(kind, shape, classes, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(kind, shape, classes, options)


@pytest.mark.parametrize(
    ("kind", "options", "epochs", "floor"),
    [("logreg", None, 5, 0.85), ("mlp", None, 10, 0.85), ("cnn", {"channels": [8, 16]}, 5, 0.85)],
)
def test_each_kind_learns_digits(digits, kind, options, epochs, floor) -> None:
    x, y = digits
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    model = init_model(kind, (64,), 10, options, seed=1)
    set_standardization(model, *moments_to_standardization(*feature_moments(x_train)))
    before = evaluate(model, x_test, y_test).accuracy
    train_local(model, x_train, y_train, TrainSettings("adam", 3e-3, epochs, 32, seed=0))
    after = evaluate(model, x_test, y_test).accuracy
    assert after > floor > before  # chance is 0.1
    print(f"digits {kind}: accuracy {before:.3f} -> {after:.3f}")


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_tabular_kinds_learn_breast_cancer(kind: str) -> None:
    frame = load_breast_cancer()
    x = frame.drop(columns="diagnosis").to_numpy(np.float32)
    y = frame["diagnosis"].to_numpy(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    train, test = perm[:450], perm[450:]
    model = init_model(kind, (30,), 2, None, seed=2)
    set_standardization(model, *moments_to_standardization(*feature_moments(x[train])))
    train_local(model, x[train], y[train], TrainSettings("sgd", 0.05, 20, 32, seed=0))
    assert evaluate(model, x[test], y[test]).accuracy > 0.9  # majority class is ~0.63


def test_init_model_is_seeded_and_leaves_global_rng_alone() -> None:
    for kind, shape in (("logreg", (30,)), ("mlp", (30,)), ("cnn", (64,))):
        state = torch.random.get_rng_state()
        a = model_to_arrays(init_model(kind, shape, 3, None, seed=11))
        assert torch.equal(state, torch.random.get_rng_state())
        b = model_to_arrays(init_model(kind, shape, 3, None, seed=11))
        c = model_to_arrays(init_model(kind, shape, 3, None, seed=12))
        torch.manual_seed(11)
        d = model_to_arrays(build_model(kind, shape, 3))
        assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], d[k]) for k in a)
        assert not all(np.array_equal(a[k], c[k]) for k in a if not k.startswith("standardize"))
        assert np.all(a["standardize.mean"] == 0) and np.all(a["standardize.std"] == 1)


def test_standardization_makes_model_work_on_raw_features() -> None:
    rng = np.random.default_rng(3)
    raw = rng.normal(50.0, 7.0, size=(20, 4)).astype(np.float32)
    raw[:, 2] = 5.0  # constant column: std 0 must become 1
    mean, std = moments_to_standardization(*feature_moments(raw))
    assert std[2] == 0.0
    with_std = init_model("mlp", (4,), 2, None, seed=0)
    set_standardization(with_std, mean, std)
    plain = init_model("mlp", (4,), 2, None, seed=0)
    safe = np.where(std < 1e-8, 1.0, std)
    expected = plain(torch.from_numpy(((raw - mean) / safe).astype(np.float32)))
    got = with_std(torch.from_numpy(raw))
    assert torch.allclose(got, expected, atol=1e-5)
    assert model_to_arrays(with_std)["standardize.std"][2] == 1.0
    assert not any(p is with_std[0].mean for p in with_std.parameters())  # buffers, not params


def test_set_standardization_rejects_bad_input() -> None:
    model = init_model("logreg", (4,), 2, None, seed=0)
    with pytest.raises(ValueError, match="shape"):
        set_standardization(model, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        set_standardization(model, np.array([0, np.nan, 0, 0]), np.ones(4))
    with pytest.raises(ValueError, match="Standardize"):
        set_standardization(torch.nn.Linear(4, 2), np.zeros(4), np.ones(4))


def test_model_to_arrays_sorted_float32_copies() -> None:
    model = init_model("cnn", (64,), 10, None, seed=0)
    arrays = model_to_arrays(model)
    assert list(arrays) == sorted(arrays)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays.values())
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert not np.array_equal(arrays["head.weight"], model_to_arrays(model)["head.weight"])


def test_arrays_round_trip_through_bytes_into_fresh_model() -> None:
    source = init_model("mlp", (30,), 2, {"hidden": [16]}, seed=5)
    set_standardization(source, np.full(30, 2.0), np.full(30, 3.0))
    blob = weights_to_bytes(model_to_arrays(source))
    target = init_model("mlp", (30,), 2, {"hidden": [16]}, seed=6)
    arrays_to_model(target, weights_from_bytes(blob))
    x = torch.randn(8, 30)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda a: a.__setitem__("head.bias", np.array([np.nan, 0], np.float32)),
            "'head.bias'.*NaN",
        ),
        (lambda a: a.__setitem__("head.bias", np.array([np.inf, 0], np.float32)), "'head.bias'"),
        (lambda a: a.__setitem__("head.weight", np.zeros((2, 29), np.float32)), "'head.weight'"),
        (lambda a: a.__setitem__("head.bias", np.zeros(2, np.float64)), "'head.bias'.*float32"),
        (lambda a: a.pop("head.bias"), "missing \\['head.bias'\\]"),
        (lambda a: a.__setitem__("extra", np.zeros(1, np.float32)), "unexpected \\['extra'\\]"),
    ],
)
def test_arrays_to_model_is_strict(mutate, match) -> None:
    model = init_model("logreg", (30,), 2, None, seed=0)
    before = model_to_arrays(model)
    arrays = model_to_arrays(model)
    mutate(arrays)
    with pytest.raises(ValueError, match=match):
        arrays_to_model(model, arrays)
    after = model_to_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # untouched on error


def test_weights_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="safetensors"):
        weights_from_bytes(b"definitely not safetensors")


def test_flatten_unflatten_round_trip() -> None:
    arrays = model_to_arrays(init_model("cnn", (64,), 10, None, seed=0))
    vec, layout = flatten(arrays)
    assert vec.dtype == np.float32 and vec.ndim == 1
    assert vec.size == sum(a.size for a in arrays.values())
    assert [name for name, _ in layout] == sorted(arrays)
    back = unflatten(vec, layout)
    assert list(back) == list(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    vec[:] = 0  # results are copies, not views
    assert any(np.any(back[k] != 0) for k in back)
    with pytest.raises(ValueError, match="layout needs"):
        unflatten(np.zeros(vec.size + 1, np.float32), layout)
    with pytest.raises(ValueError, match="1-D"):
        unflatten(np.zeros((2, 2), np.float32), layout)


def test_model_kinds_listed() -> None:
    assert MODEL_KINDS == ("logreg", "mlp", "cnn")
