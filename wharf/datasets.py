"""Small public datasets bundled with Wharf, loaded as named pandas tables.

Examples, tests and benchmarks need real data that works offline and is the same
everywhere, so two UCI datasets ship inside the package (see ``wharf/data/README.md``
for provenance and licence). They are read through :mod:`importlib.resources` so the
loaders work from a source checkout, an editable install and a wheel alike.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Mapping
from importlib import resources
from types import MappingProxyType

import numpy as np
import pandas as pd

__all__ = [
    "BREAST_CANCER_FEATURES",
    "BUILTIN_DATASETS",
    "DIGITS_FEATURES",
    "breast_cancer_published_ranges",
    "load_breast_cancer",
    "load_digits",
    "scale_to_published_ranges",
]

_MEASUREMENTS = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave_points",
    "symmetry",
    "fractal_dimension",
)

#: Breast-cancer feature names: scikit-learn's names in snake case, in file order.
BREAST_CANCER_FEATURES: tuple[str, ...] = (
    *(f"mean_{m}" for m in _MEASUREMENTS),
    *(f"{m}_error" for m in _MEASUREMENTS),
    *(f"worst_{m}" for m in _MEASUREMENTS),
)

#: Digits pixel columns, row-major over the 8x8 image.
DIGITS_FEATURES: tuple[str, ...] = tuple(f"p{i}" for i in range(64))


def _read_bytes(name: str) -> bytes:
    return resources.files("wharf").joinpath("data", name).read_bytes()


def load_breast_cancer() -> pd.DataFrame:
    """Breast Cancer Wisconsin (Diagnostic): 569 rows, 30 float features, ``diagnosis``.

    ``diagnosis`` is 0 = malignant, 1 = benign, the encoding scikit-learn uses, so
    results compare directly with the literature built on it. The file's first line
    is a scikit-learn header (row count, feature count, class names); it is checked
    against the body rather than trusted, so a damaged copy fails loudly.
    """
    text = _read_bytes("breast_cancer.csv").decode("ascii")
    header, _, body = text.partition("\n")
    n_rows_s, n_features_s, *class_names = header.strip().split(",")
    n_rows, n_features = int(n_rows_s), int(n_features_s)
    if n_features != len(BREAST_CANCER_FEATURES) or class_names != ["malignant", "benign"]:
        raise RuntimeError(f"bundled breast_cancer.csv has an unexpected header: {header!r}")
    columns = [*BREAST_CANCER_FEATURES, "diagnosis"]
    frame = pd.read_csv(io.StringIO(body), header=None, names=columns)
    if len(frame) != n_rows:
        raise RuntimeError(f"bundled breast_cancer.csv has {len(frame)} rows, header says {n_rows}")
    frame[list(BREAST_CANCER_FEATURES)] = frame[list(BREAST_CANCER_FEATURES)].astype(np.float64)
    frame["diagnosis"] = frame["diagnosis"].astype(np.int64)
    return frame


def breast_cancer_published_ranges() -> dict[str, tuple[float, float]]:
    """Each breast-cancer feature's (min, max) from the dataset's published description.

    The summary-statistics table of ``breast_cancer.rst`` (the UCI/scikit-learn
    description shipped beside the data) states every feature's range. A data holder
    can scale by these without looking at anyone's data — which is what a job with
    differential privacy needs, since the federated standardisation round would be
    an un-noised release.
    """
    text = _read_bytes("breast_cancer.rst").decode("utf-8")
    start = text.index(":Summary Statistics:")
    ranges: list[tuple[float, float]] = []
    rules = 0
    for line in text[start:].splitlines():
        if line.startswith("====="):
            rules += 1
            if rules == 3:  # the table's closing rule
                break
            continue
        if rules == 2 and line.strip():
            parts = line.rsplit(None, 2)
            ranges.append((float(parts[1]), float(parts[2])))
    if len(ranges) != len(BREAST_CANCER_FEATURES):
        raise RuntimeError(f"breast_cancer.rst lists {len(ranges)} ranges, expected 30")
    return dict(zip(BREAST_CANCER_FEATURES, ranges, strict=True))


def scale_to_published_ranges(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of breast-cancer rows with each feature mapped to [0, 1] by its published range."""
    out = frame.copy()
    for name, (lo, hi) in breast_cancer_published_ranges().items():
        if name in out.columns:
            out[name] = (out[name] - lo) / (hi - lo)
    return out


def load_digits() -> pd.DataFrame:
    """Optical Recognition of Handwritten Digits: 1797 rows of 8x8 pixels, ``digit``.

    Pixels ``p0``..``p63`` are counts 0..16 returned as float (models consume floats;
    keeping the raw scale lets the federated standardisation do its job). ``digit``
    is the int label 0..9.
    """
    raw = gzip.decompress(_read_bytes("digits.csv.gz")).decode("ascii")
    frame = pd.read_csv(io.StringIO(raw), header=None, names=[*DIGITS_FEATURES, "digit"])
    frame[list(DIGITS_FEATURES)] = frame[list(DIGITS_FEATURES)].astype(np.float64)
    frame["digit"] = frame["digit"].astype(np.int64)
    return frame


#: name -> (loader, label column). Read-only so no caller can swap a loader globally.
BUILTIN_DATASETS: Mapping[str, tuple[Callable[[], pd.DataFrame], str]] = MappingProxyType(
    {
        "breast_cancer": (load_breast_cancer, "diagnosis"),
        "digits": (load_digits, "digit"),
    }
)
