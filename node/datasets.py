"""Reading a data holder's local files: format detection, validation, description.

When an operator runs ``wharf node dataset add`` the node describes the file —
format, rows, columns and dtypes, a content fingerprint and a schema hash — and
signs that as the registration certificate. Only metadata leaves the node; the
label distribution is deliberately not part of the description (it is private).

Mistakes an operator can make (wrong path, wrong column, text in a feature column,
missing values) raise :class:`DatasetError` with one sentence saying what to fix,
so the CLI can print it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DatasetDescription",
    "DatasetError",
    "Format",
    "describe",
    "detect_format",
    "file_fingerprint",
    "load_arrays",
    "read_table",
    "schema_hash",
]

Format = Literal["csv", "parquet", "npz"]

_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npz": "npz",
}
_CHUNK = 1 << 20


class DatasetError(ValueError):
    """A problem with a dataset file that the operator can fix."""


@dataclass(frozen=True)
class DatasetDescription:
    """Metadata about a registered dataset; contains no rows and no label statistics.

    ``schema`` lists ``(column, dtype)`` for the features (in order) then the label.
    For npz the column is the array name and the dtype carries the per-sample shape,
    e.g. ``("images", "float64[1,8,8]")``. ``schema_hash`` is independent of the
    file format, so the same table as CSV or Parquet hashes alike when dtypes agree.
    """

    format: Format
    num_rows: int
    label: str
    features: tuple[str, ...]
    schema: tuple[tuple[str, str], ...]
    feature_shape: tuple[int, ...]
    fingerprint: str
    schema_hash: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists) for storage and certificates."""
        out: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return out


def detect_format(path: str | Path) -> Format:
    """The format implied by the suffix: ``.csv``/``.csv.gz``, ``.parquet``/``.pq`` or ``.npz``."""
    name = Path(path).name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise DatasetError(
        f"cannot tell the format of {Path(path).name!r}; use a .csv, .parquet or .npz file"
    )


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 hex of the file's bytes, read in 1 MiB chunks (any file size)."""
    digest = hashlib.sha256()
    with open(_existing(path), "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def schema_hash(schema: Sequence[tuple[str, str]]) -> str:
    """SHA-256 hex of the schema as canonical JSON (compact, UTF-8, order kept)."""
    canonical = json.dumps([[c, t] for c, t in schema], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(
            f"dataset file {str(p)!r} does not exist or is not a file; check the path"
        )
    return p


def _columns(path: Path, fmt: Format) -> list[str]:
    try:
        if fmt == "csv":
            return [str(c) for c in pd.read_csv(path, nrows=0).columns]
        return list(pq.read_schema(path).names)
    except (OSError, ValueError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise DatasetError(f"could not read {path.name!r} as {fmt}: {exc}") from exc


def read_table(path: str | Path, fmt: Format, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet file into a DataFrame (only ``columns``, in that order, if given)."""
    p = _existing(path)
    if fmt not in ("csv", "parquet"):
        raise DatasetError(f"read_table reads csv or parquet, not {fmt}; use load_arrays for npz")
    wanted = list(columns) if columns is not None else None
    try:
        if fmt == "csv":
            frame = pd.read_csv(p, usecols=wanted)
        else:
            frame = pd.read_parquet(p, columns=wanted)
    except (OSError, ValueError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise DatasetError(f"could not read {p.name!r} as {fmt}: {exc}") from exc
    return frame[wanted] if wanted is not None else frame


def _pick_table_columns(
    available: list[str], label: str, features: Sequence[str] | None
) -> list[str]:
    if label not in available:
        raise DatasetError(
            f"label column {label!r} is not in the file; columns are: {', '.join(available)}"
        )
    chosen = [c for c in available if c != label] if features is None else list(features)
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise DatasetError(f"feature column(s) {unknown} are not in the file; check the names")
    if label in chosen:
        raise DatasetError(f"column {label!r} is the label; remove it from the features")
    if len(set(chosen)) != len(chosen):
        raise DatasetError("a feature column is listed twice; list each column once")
    if not chosen:
        raise DatasetError("no feature columns left; the file needs at least one besides the label")
    return chosen


def _numeric(dtype: Any) -> bool:
    return bool(pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype))


def _table(
    p: Path, fmt: Format, label: str, features: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    chosen = _pick_table_columns(_columns(p, fmt), label, features)
    frame = read_table(p, fmt, [*chosen, label])
    if frame.empty:  # checked first: an empty CSV's columns read as text
        raise DatasetError(f"{p.name!r} has no rows; register a file with data")
    bad = [c for c in chosen if not _numeric(frame[c].dtype)]
    if bad:
        raise DatasetError(
            f"feature column(s) {bad} are not numeric; encode them as numbers or leave them out"
        )
    if not _numeric(frame[label].dtype):
        raise DatasetError(
            f"label column {label!r} is not numeric; encode classes as integers 0..K-1"
        )
    x = frame[chosen].to_numpy(dtype=np.float64, na_value=np.nan)
    y = frame[label].to_numpy(dtype=np.float64, na_value=np.nan)
    schema = [(c, str(frame[c].dtype)) for c in [*chosen, label]]
    return x, y, chosen, schema


def _npz(
    p: Path, label: str, features: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(f"{p.name!r} is not an .npz archive; save it with numpy.savez")
        with loaded as npz:
            names = list(npz.files)
            if label not in names:
                raise DatasetError(
                    f"label array {label!r} is not in the npz; arrays are: {', '.join(names)}"
                )
            if features is None:
                others = [n for n in names if n != label]
                if len(others) != 1:
                    raise DatasetError(
                        f"the npz holds {len(others)} arrays besides the label; "
                        "name the feature array explicitly"
                    )
                features = others
            if len(features) != 1:
                raise DatasetError(
                    "for npz, name exactly one feature array (e.g. --features images)"
                )
            (feature,) = features
            if feature not in names:
                raise DatasetError(
                    f"feature array {feature!r} is not in the npz; arrays are: {', '.join(names)}"
                )
            if feature == label:
                raise DatasetError(f"array {label!r} is the label; name a different feature array")
            x, y = npz[feature], npz[label]
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"could not read {p.name!r} as npz: {exc}") from exc
    if not _numeric(x.dtype) or x.ndim < 1:
        raise DatasetError(f"feature array {feature!r} must be a numeric array of shape (n, ...)")
    if not _numeric(y.dtype) or y.ndim != 1:
        raise DatasetError(f"label array {label!r} must be a 1-D numeric array of class ids")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"feature array has {x.shape[0]} samples but label array has {y.shape[0]}; "
            "they must match"
        )
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    sample = ",".join(str(d) for d in x.shape[1:])
    schema = [(feature, f"{x.dtype.name}[{sample}]"), (label, y.dtype.name)]
    return x.astype(np.float64), y.astype(np.float64), [feature], schema


def _load(
    path: str | Path, label: str, features: Sequence[str] | None
) -> tuple[Format, np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    fmt = detect_format(path)
    p = _existing(path)
    if fmt == "npz":
        x, y, chosen, schema = _npz(p, label, features)
    else:
        x, y, chosen, schema = _table(p, fmt, label, features)
    if y.shape[0] == 0:
        raise DatasetError(f"{p.name!r} has no rows; register a file with data")
    if not np.all(np.isfinite(x)):
        raise DatasetError(
            "features contain missing (NaN) or infinite values; clean or impute them"
        )
    if not np.all(np.isfinite(y)):
        raise DatasetError(f"label {label!r} has missing (NaN) values; drop or fill those rows")
    if np.any(y < 0) or np.any(np.floor(y) != y):
        raise DatasetError(f"label {label!r} must hold integer class ids 0..K-1; re-encode it")
    if not np.all(np.isfinite(x.astype(np.float32))):
        raise DatasetError("feature values exceed float32 range; rescale them")
    return fmt, x, y, chosen, schema


def describe(path: str | Path, label: str, features: list[str] | None = None) -> DatasetDescription:
    """Validate a dataset file and describe it for registration (no rows, no label stats).

    ``features`` defaults to every column except the label (for npz: the one other
    array). The whole file is validated now so a broken dataset fails at registration,
    not in the middle of a job.
    """
    fmt, x, y, chosen, schema = _load(path, label, features)
    return DatasetDescription(
        format=fmt,
        num_rows=int(y.shape[0]),
        label=label,
        features=tuple(chosen),
        schema=tuple(schema),
        feature_shape=tuple(int(d) for d in x.shape[1:]),
        fingerprint=file_fingerprint(path),
        schema_hash=schema_hash(schema),
    )


def load_arrays(
    path: str | Path, label: str, features: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``X`` float32 of shape ``(n, *feature_shape)`` and ``y`` int64 of shape ``(n,)``.

    Applies the same validation as :func:`describe`. Callers that must be sure the
    file is the registered one compare :func:`file_fingerprint` first.
    """
    _, x, y, _, _ = _load(path, label, features)
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)
