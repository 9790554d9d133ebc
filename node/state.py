"""The node's own small database: registered datasets (and, later, grants,
receipts and its budget ledger). It survives restarts with the node's identity.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("label", sa.String(256), nullable=False),
    sa.Column("features_json", sa.Text, nullable=False),
    sa.Column("feature_shape_json", sa.Text, nullable=False),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("schema_hash", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("added", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    path: str
    format: str
    label: str
    features: list[str]
    feature_shape: list[int]
    schema: list[list[str]]
    schema_hash: str
    fingerprint: str
    rows: int
    added: float


def _pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class NodeState:
    """Typed access to the node database under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.engine: Engine = sa.create_engine(f"sqlite:///{state_dir / 'node.db'}")
        event.listen(self.engine, "connect", _pragmas)
        metadata.create_all(self.engine)

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"

    def add_dataset(
        self,
        name: str,
        path: Path,
        *,
        fmt: str,
        label: str,
        features: list[str],
        feature_shape: list[int],
        schema: list[list[str]],
        schema_hash: str,
        fingerprint: str,
        rows: int,
        replace: bool = False,
    ) -> RegisteredDataset:
        with self.engine.begin() as c:
            exists = c.execute(sa.select(datasets.c.name).where(datasets.c.name == name)).first()
            if exists and not replace:
                raise ValueError(f"dataset {name!r} is already registered (use --replace)")
            if exists:
                c.execute(datasets.delete().where(datasets.c.name == name))
            c.execute(
                datasets.insert().values(
                    name=name,
                    path=str(path.resolve()),
                    format=fmt,
                    label=label,
                    features_json=json.dumps(features),
                    feature_shape_json=json.dumps(feature_shape),
                    schema_json=json.dumps(schema),
                    schema_hash=schema_hash,
                    fingerprint=fingerprint,
                    rows=rows,
                    added=time.time(),
                )
            )
        got = self.get_dataset(name)
        assert got is not None
        return got

    def get_dataset(self, name: str) -> RegisteredDataset | None:
        with self.engine.connect() as c:
            r = c.execute(datasets.select().where(datasets.c.name == name)).mappings().first()
        return _row(r) if r else None

    def list_datasets(self) -> list[RegisteredDataset]:
        with self.engine.connect() as c:
            return [
                _row(r) for r in c.execute(datasets.select().order_by(datasets.c.name)).mappings()
            ]

    def remove_dataset(self, name: str) -> bool:
        with self.engine.begin() as c:
            return bool(c.execute(datasets.delete().where(datasets.c.name == name)).rowcount)


def _row(r: sa.RowMapping) -> RegisteredDataset:
    return RegisteredDataset(
        name=r["name"],
        path=r["path"],
        format=r["format"],
        label=r["label"],
        features=json.loads(r["features_json"]),
        feature_shape=json.loads(r["feature_shape_json"]),
        schema=json.loads(r["schema_json"]),
        schema_hash=r["schema_hash"],
        fingerprint=r["fingerprint"],
        rows=int(r["rows"]),
        added=float(r["added"]),
    )
