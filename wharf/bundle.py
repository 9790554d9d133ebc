"""Task bundles: a developer's own model code, packed deterministically.

A bundle is a directory of Python files (and small data files) with declared
entry points (``bundle.model`` builds the ``torch.nn.Module``; optional
``bundle.train_step`` runs one optimisation step). It is packed as a zip whose
bytes depend only on the files' relative paths and contents — sorted entries,
fixed timestamps and permissions — so its SHA-256 identifies the code exactly
and can be bound into the job hash and a node's grant.

The initial weights are built on the developer's own machine (their code, their
machine) and travel inside the bundle as ``wharf-initial.safetensors``, so the
coordinator never executes developer code; nodes run it only inside the
training worker process.
"""

from __future__ import annotations

import importlib
import io
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

MAX_BUNDLE_SIZE = 4 << 20
"""Bundles travel inside one SubmitJob message; 4 MiB keeps it well under the limit."""

INITIAL_WEIGHTS = "wharf-initial.safetensors"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


class BundleError(ValueError):
    """A bundle cannot be packed, unpacked or loaded."""


def pack(directory: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """Pack a directory (plus ``extra`` generated files) into deterministic zip bytes."""
    if not directory.is_dir():
        raise BundleError(f"bundle directory not found: {directory}")
    files: dict[str, bytes] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part in _SKIP_DIRS for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise BundleError(f"bundle may not contain symlinks: {rel}")
        if path.is_file():
            files[rel.as_posix()] = path.read_bytes()
    for name, data in (extra or {}).items():
        files[name] = data
    if not any(name.endswith(".py") for name in files):
        raise BundleError(f"bundle directory {directory} contains no Python file")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[name])
    data = buf.getvalue()
    if len(data) > MAX_BUNDLE_SIZE:
        raise BundleError(
            f"bundle is {len(data)} bytes packed; the limit is {MAX_BUNDLE_SIZE} "
            "(ship data through datasets, not the bundle)"
        )
    return data


def list_files(data: bytes) -> dict[str, bytes]:
    """Read a packed bundle's files (validating names), e.g. for an operator to review."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise BundleError("bundle is not a valid zip archive") from None
    out: dict[str, bytes] = {}
    total = 0
    with zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or info.filename.startswith("/"):
                raise BundleError(f"bundle entry escapes its directory: {info.filename}")
            total += info.file_size
            if total > 8 * MAX_BUNDLE_SIZE:
                raise BundleError("bundle expands beyond its size limit")
            out[info.filename] = zf.read(info)
    return out


def unpack(data: bytes, target: Path) -> None:
    """Extract a bundle into ``target`` (refusing path traversal)."""
    for name, content in list_files(data).items():
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)


def load_entry(root: Path, entry: str) -> Callable[..., Any]:
    """Import ``module:function`` from an unpacked bundle directory."""
    module_name, _, func_name = entry.partition(":")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BundleError(f"cannot import bundle module {module_name!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise BundleError(f"bundle entry {entry!r} is not a callable")
    return func  # type: ignore[no-any-return]
