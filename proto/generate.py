"""Regenerate the committed Python modules from the ``.proto`` sources.

Why a script and not a build hook: generated modules are committed so that an
install needs no ``grpcio-tools``; this script (and the staleness test that
calls :func:`generate`) keeps them honest. Each ``proto/NAME.proto`` is
compiled as ``wharf/proto/NAME.proto`` so the generated imports read
``from wharf.proto import NAME_pb2``.

Usage: ``python -m wharf.proto.generate`` (writes into ``proto/``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every ``*.proto`` in ``proto_dir`` and write the modules to ``out_dir``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pkg = root / "wharf" / "proto"
        pkg.mkdir(parents=True)
        sources = sorted(proto_dir.glob("*.proto"))
        for src in sources:
            shutil.copy(src, pkg / src.name)
        include = Path(protoc.__file__).parent / "_proto"
        for src in sources:
            args = [
                "protoc",
                f"-I{root}",
                f"-I{include}",
                f"--python_out={root}",
                f"--pyi_out={root}",
                f"--grpc_python_out={root}",
                f"wharf/proto/{src.name}",
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {src.name}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for produced in sorted(pkg.iterdir()):
            if produced.suffix in {".py", ".pyi"}:
                target = out_dir / produced.name
                shutil.copy(produced, target)
                written.append(target)
    return written


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path.relative_to(PROTO_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
