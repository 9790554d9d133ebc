"""Bundled datasets and node-side reading of csv, parquet and npz files (real files)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wharf.datasets import (
    BREAST_CANCER_FEATURES,
    BUILTIN_DATASETS,
    load_breast_cancer,
    load_digits,
)
from wharf.node.datasets import (
    DatasetError,
    describe,
    detect_format,
    file_fingerprint,
    load_arrays,
    read_table,
    schema_hash,
)

# --- bundled datasets -------------------------------------------------------------


def test_breast_cancer_table() -> None:
    frame = load_breast_cancer()
    assert frame.shape == (569, 31)
    assert list(frame.columns) == [*BREAST_CANCER_FEATURES, "diagnosis"]
    assert frame.columns[0] == "mean_radius" and frame.columns[29] == "worst_fractal_dimension"
    assert "concave_points_error" in frame.columns
    assert all(frame[c].dtype == np.float64 for c in BREAST_CANCER_FEATURES)
    assert frame["diagnosis"].dtype == np.int64
    assert frame["diagnosis"].value_counts().to_dict() == {0: 212, 1: 357}  # 0 = malignant
    first = frame.iloc[0]
    assert first["mean_radius"] == 17.99 and first["worst_area"] == 2019.0
    assert first["diagnosis"] == 0


def test_digits_table() -> None:
    frame = load_digits()
    assert frame.shape == (1797, 65)
    assert list(frame.columns) == [*(f"p{i}" for i in range(64)), "digit"]
    pixels = frame.drop(columns="digit")
    assert all(pixels.dtypes == np.float64)
    assert pixels.to_numpy().min() == 0.0 and pixels.to_numpy().max() == 16.0
    assert frame["digit"].dtype == np.int64
    assert sorted(frame["digit"].unique().tolist()) == list(range(10))


def test_builtin_registry() -> None:
    assert set(BUILTIN_DATASETS) == {"breast_cancer", "digits"}
    for loader, label in BUILTIN_DATASETS.values():
        assert label in loader().columns


# --- node-side files ---------------------------------------------------------------


@pytest.fixture()
def cancer_files(tmp_path: Path) -> dict[str, Path]:
    """The bundled table written as CSV, then converted to Parquet and npz."""
    frame = load_breast_cancer()
    csv = tmp_path / "cancer.csv"
    frame.to_csv(csv, index=False)
    parquet = tmp_path / "cancer.parquet"
    pd.read_csv(csv).to_parquet(parquet, index=False)
    npz = tmp_path / "cancer.npz"
    back = pd.read_csv(csv)
    np.savez(
        npz,
        features=back.drop(columns="diagnosis").to_numpy(),
        diagnosis=back["diagnosis"].to_numpy(),
    )
    return {"csv": csv, "parquet": parquet, "npz": npz}


def test_detect_format() -> None:
    assert detect_format("a/b.csv") == "csv"
    assert detect_format("B.CSV.GZ") == "csv"
    assert detect_format("x.parquet") == "parquet"
    assert detect_format("x.pq") == "parquet"
    assert detect_format(Path("x.npz")) == "npz"
    with pytest.raises(DatasetError, match=re.escape("use a .csv, .parquet or .npz")):
        detect_format("data.xlsx")
    assert issubclass(DatasetError, ValueError)


def test_describe_and_load_all_three_formats(cancer_files: dict[str, Path]) -> None:
    reference = load_breast_cancer()
    expected_x = reference[list(BREAST_CANCER_FEATURES)].to_numpy(np.float32)
    expected_y = reference["diagnosis"].to_numpy(np.int64)
    descriptions = {}
    for fmt, path in cancer_files.items():
        features = ["features"] if fmt == "npz" else None
        desc = describe(path, "diagnosis", features)
        descriptions[fmt] = desc
        assert desc.format == fmt
        assert desc.num_rows == 569
        assert desc.feature_shape == (30,)
        assert desc.label == "diagnosis"
        assert desc.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
        assert desc.fingerprint == file_fingerprint(path)
        assert desc.schema_hash == schema_hash(desc.schema)
        assert "num_classes" not in desc.to_dict()  # the label distribution stays private
        x, y = load_arrays(path, "diagnosis", features)
        assert x.dtype == np.float32 and x.shape == (569, 30)
        assert y.dtype == np.int64 and y.shape == (569,)
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)
    table = descriptions["csv"]
    assert table.features == BREAST_CANCER_FEATURES
    assert table.schema[0] == ("mean_radius", "float64")
    assert table.schema[-1] == ("diagnosis", "int64")
    assert descriptions["parquet"].schema_hash == table.schema_hash  # format-independent
    assert descriptions["npz"].schema == (("features", "float64[30]"), ("diagnosis", "int64"))
    assert descriptions["npz"].features == ("features",)


def test_feature_subset_keeps_requested_order(cancer_files: dict[str, Path]) -> None:
    chosen = ["worst_area", "mean_radius"]
    for fmt in ("csv", "parquet"):
        desc = describe(cancer_files[fmt], "diagnosis", chosen)
        assert desc.features == tuple(chosen)
        assert desc.feature_shape == (2,)
        assert [c for c, _ in desc.schema] == [*chosen, "diagnosis"]
        x, _ = load_arrays(cancer_files[fmt], "diagnosis", chosen)
        assert x[0].tolist() == [2019.0, pytest.approx(17.99)]
    full = describe(cancer_files["csv"], "diagnosis")
    assert describe(cancer_files["csv"], "diagnosis", chosen).schema_hash != full.schema_hash
    assert list(read_table(cancer_files["csv"], "csv", chosen).columns) == chosen


def test_npz_images_keep_their_sample_shape(tmp_path: Path) -> None:
    digits = load_digits()
    images = digits.drop(columns="digit").to_numpy(np.float32).reshape(-1, 1, 8, 8)
    path = tmp_path / "digits.npz"
    np.savez(path, images=images, labels=digits["digit"].to_numpy())
    desc = describe(path, "labels")  # the only other array is taken as the features
    assert desc.feature_shape == (1, 8, 8)
    assert desc.features == ("images",)
    assert desc.schema[0] == ("images", "float32[1,8,8]")
    x, y = load_arrays(path, "labels", ["images"])
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    np.testing.assert_array_equal(x, images)


def _csv(tmp_path: Path, frame: pd.DataFrame, name: str = "d.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        describe(tmp_path / "nope.csv", "y")
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DatasetError, match="not a file"):
        load_arrays(folder, "y")


def test_unknown_label_and_feature_columns(tmp_path: Path) -> None:
    path = _csv(tmp_path, pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}))
    with pytest.raises(DatasetError, match="label column 'target' is not in the file"):
        describe(path, "target")
    with pytest.raises(DatasetError, match=r"feature column\(s\) \['b'\] are not in the file"):
        describe(path, "y", ["a", "b"])
    with pytest.raises(DatasetError, match="is the label"):
        describe(path, "y", ["a", "y"])
    with pytest.raises(DatasetError, match="no feature columns"):
        describe(path, "y", [])


def test_non_numeric_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "city": ["x", "y"], "y": [0, 1]})
    path = _csv(tmp_path, frame)
    with pytest.raises(DatasetError, match=r"\['city'\] are not numeric"):
        describe(path, "y")
    assert describe(path, "y", ["a"]).features == ("a",)  # leaving it out works
    labels = _csv(tmp_path, pd.DataFrame({"a": [1.0, 2.0], "y": ["M", "B"]}), "l.csv")
    with pytest.raises(DatasetError, match="encode classes as integers"):
        describe(labels, "y")


def test_nan_in_features_or_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path, pd.DataFrame({"a": [1.0, np.nan], "y": [0, 1]}))
    with pytest.raises(DatasetError, match="features contain missing"):
        describe(path, "y")
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": [0, None]})
    parquet = tmp_path / "d.parquet"
    frame.to_parquet(parquet)
    with pytest.raises(DatasetError, match="label 'y' has missing"):
        load_arrays(parquet, "y")


def test_bad_label_values(tmp_path: Path) -> None:
    path = _csv(tmp_path, pd.DataFrame({"a": [1.0, 2.0], "y": [0.5, 1.0]}))
    with pytest.raises(DatasetError, match="integer class ids"):
        describe(path, "y")
    negative = _csv(tmp_path, pd.DataFrame({"a": [1.0, 2.0], "y": [-1, 1]}), "n.csv")
    with pytest.raises(DatasetError, match="integer class ids"):
        describe(negative, "y")


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3)), y=np.zeros(4, np.int64), z=np.zeros(4))
    with pytest.raises(DatasetError, match="label array 'labels' is not in the npz"):
        describe(path, "labels", ["x"])
    with pytest.raises(DatasetError, match="feature array 'images' is not in the npz"):
        describe(path, "y", ["images"])
    with pytest.raises(DatasetError, match="name the feature array"):
        describe(path, "y")  # two candidates: x and z
    with pytest.raises(DatasetError, match="exactly one feature array"):
        describe(path, "y", ["x", "z"])
    short = tmp_path / "short.npz"
    np.savez(short, x=np.zeros((4, 3)), y=np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match="4 samples but label array has 3"):
        load_arrays(short, "y", ["x"])
    objects = tmp_path / "obj.npz"
    np.savez(objects, x=np.array([{"a": 1}] * 2, dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match=re.escape("could not read 'obj.npz' as npz")):
        describe(objects, "y", ["x"])  # object arrays would need pickle: refused
    not_zip = tmp_path / "fake.npz"
    not_zip.write_bytes(b"hello")
    with pytest.raises(DatasetError, match=re.escape("fake.npz")):
        describe(not_zip, "y", ["x"])


def test_corrupt_parquet_and_empty_csv(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=re.escape("could not read 'bad.parquet' as parquet")):
        describe(bad, "y")
    empty = _csv(tmp_path, pd.DataFrame({"a": pd.Series([], dtype=float), "y": []}))
    with pytest.raises(DatasetError, match="no rows"):
        describe(empty, "y")
