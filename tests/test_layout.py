"""The house rules of the repository layout, and the generated protocol modules."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("algorithms", ("wharf.coordinator", "wharf.node")),
        ("coordinator", ("wharf.node",)),
        ("node", ("wharf.coordinator",)),
    ],
)
def test_import_rules(folder: str, forbidden: tuple[str, ...]) -> None:
    for path, names in _imports(folder).items():
        bad = sorted(n for n in names if n.startswith(forbidden))
        assert not bad, f"{path} imports {bad}"


def test_top_level_layout_and_package_mapping() -> None:
    for name in (
        "pyproject.toml",
        "README.md",
        "proto",
        "coordinator",
        "node",
        "algorithms",
        "benchmarks",
        "tests",
        "wharf",
    ):
        assert (ROOT / name).exists(), name
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["name"] == "datawharf"
    mapping = config["tool"]["setuptools"]["package-dir"]
    assert mapping["wharf"] == "wharf"
    assert mapping["wharf.proto"] == "proto"
    assert mapping["wharf.coordinator"] == "coordinator"
    assert mapping["wharf.node"] == "node"
    assert mapping["wharf.algorithms"] == "algorithms"
    assert config["project"]["scripts"]["wharf"] == "wharf.cli:main"


def test_generated_protocol_modules_are_fresh(tmp_path: Path) -> None:
    from wharf.proto.generate import PROTO_DIR, generate

    written = generate(tmp_path)
    assert written, "no .proto compiled"
    for fresh in written:
        committed = PROTO_DIR / fresh.name
        assert committed.exists(), (
            f"{fresh.name} is not committed; run python -m wharf.proto.generate"
        )
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{fresh.name} is stale relative to the .proto sources; "
            "run python -m wharf.proto.generate"
        )


def test_no_pickle_anywhere() -> None:
    for folder in ("wharf", "coordinator", "node", "algorithms"):
        for path, names in _imports(folder).items():
            assert "pickle" not in names and "cloudpickle" not in names, path
