"""Regenerate the Python code for protos/ into the client package.

    python scripts/generate_protos.py          # rewrite client/interactions_client/v1
    python scripts/generate_protos.py --check  # fail if the committed code is stale

Uses the pinned tools of the `dev` extra (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client" / "interactions_client" / "v1"
INIT = '"""Generated from protos/interactions/v1 by scripts/generate_protos.py; do not edit."""\n'
# protoc writes imports of the proto package path (interactions.v1) but the
# code ships inside interactions_client, so import lines (and .pyi type
# references) are rewritten. Serialized descriptors keep the real proto file
# names, which reflection and clients in other languages see.
IMPORT_LINE = re.compile(r"^from interactions\.v1 import", re.MULTILINE)
PYI_REF = re.compile(r"\binteractions\.v1\.(\w+_pb2)\b")


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    plugins = {name: shutil.which(f"protoc-gen-{name}") for name in ("mypy", "mypy_grpc")}
    missing = [name for name, path in plugins.items() if path is None]
    if missing:
        raise SystemExit("mypy-protobuf is not installed: pip install -e '.[dev]'")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            *(f"--plugin=protoc-gen-{name}={path}" for name, path in plugins.items()),
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out=quiet:{tmp}",
            f"--mypy_grpc_out=quiet:{tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*_pb2*"):
            old.unlink()
        for path in sorted((Path(tmp) / "interactions" / "v1").iterdir()):
            text = IMPORT_LINE.sub("from interactions_client.v1 import", path.read_text())
            if path.suffix == ".pyi":
                text = PYI_REF.sub(r"interactions_client.v1.\1", text)
            (out / path.name).write_text(text)
    (out / "__init__.py").write_text(INIT)


def main(argv: list[str]) -> int:
    if "--check" not in argv:
        generate(OUT)
        print(f"regenerated {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in OUT.iterdir() if p.is_file()})
        stale = [
            n
            for n in names
            if not (fresh / n).exists() or not (OUT / n).exists() or not filecmp.cmp(fresh / n, OUT / n, shallow=False)
        ]
    if stale:
        print(f"generated code is stale ({', '.join(stale)}): run python scripts/generate_protos.py", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
