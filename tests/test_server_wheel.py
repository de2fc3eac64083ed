"""The server's wheel ships the migrations (pyproject's force-include puts
migrations/ at interactions_server/migrations), and the migration runner,
imported from the unpacked wheel, finds them there rather than in a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import interactions_server
from interactions_server.storage._migrate import default_directory, load
print(interactions_server.__file__)
print(default_directory())
print(" ".join(m.path.name for m in load()))
"""


def test_the_wheel_ships_the_migrations_and_the_runner_finds_them(tmp_path: Path) -> None:
    build = [sys.executable, "-m", "build", "--wheel", str(ROOT), "-o", str(tmp_path / "dist")]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("interactions_server-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked"
    shipped = sorted(p.name for p in (unpacked / "interactions_server" / "migrations").glob("*.sql"))
    assert shipped == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))

    env = {**os.environ, "PYTHONPATH": str(unpacked)}  # ahead of the checkout's editable install
    found = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert found[0] == str(unpacked / "interactions_server" / "__init__.py")
    assert found[1] == str(unpacked / "interactions_server" / "migrations")
    assert found[2].split() == shipped
