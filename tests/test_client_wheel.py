"""The client distribution stands alone: its wheel builds, installs into a fresh
virtualenv with nothing but its declared dependencies (grpcio, protobuf), and
the stubs, clients and `interactions` command work there. (About 15 s here:
pip finds grpcio and protobuf in the local wheel cache or the registry.)"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import venv
from pathlib import Path

from interactions_server.server import App

CLIENT = Path(__file__).resolve().parents[1] / "client"
README = CLIENT.parent / "README.md"

SCRIPT = """
import importlib.util
from interactions_client import InteractionsClient, SyncInteractionsClient, InvalidEventError, validate
from interactions_client.events import new_event
from interactions_client.rpc_protos import Violation, bad_request_violations, encode_bad_request_status
from interactions_client.v1 import interaction_service_pb2_grpc, user_state_service_pb2_grpc
assert importlib.util.find_spec("google.rpc") is None, "googleapis-common-protos must not be needed"
assert validate(new_event("add_to_cart", "u1", product_id="p1", value=2)) == []
status = encode_bad_request_status(3, "bad", [Violation("user_id", "is required")])
assert bad_request_violations(status) == [("user_id", "is required")]
print("ok", interaction_service_pb2_grpc.InteractionServiceStub.__name__, SyncInteractionsClient.__name__)
"""


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def readme_example(target: str) -> str:
    """The root README's client example: logs every seed type, reads the cart back."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [example] = [b for b in blocks if "InteractionsClient(" in b]
    return example.replace('"localhost:50051"', repr(target))


async def test_wheel_installs_alone_and_works(tmp_path: Path, server: App) -> None:
    await asyncio.to_thread(install_and_check, tmp_path, server.address)
    assert await server.pool.fetchval("SELECT count(DISTINCT event_type) FROM events WHERE user_id = 'user-1'") == 18


def install_and_check(tmp_path: Path, target: str) -> None:
    run(sys.executable, "-m", "build", "--wheel", CLIENT, "-o", tmp_path / "dist")
    (wheel,) = (tmp_path / "dist").glob("interactions_client-*.whl")

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python, interactions = env / "bin" / "python", env / "bin" / "interactions"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)

    frozen = run(python, "-m", "pip", "freeze").splitlines()
    installed = {line.split("==")[0].split(" @ ")[0].lower().replace("_", "-") for line in frozen}
    assert installed - {"interactions-client", "grpcio", "protobuf", "typing-extensions"} == set()

    assert run(python, "-c", SCRIPT, cwd=tmp_path).startswith("ok InteractionServiceStub")
    assert 'product_id: "sku-42"' in run(python, "-c", readme_example(target), cwd=tmp_path)
    assert "add_to_cart" in run(interactions, "types", cwd=tmp_path)
    probe = subprocess.run(
        [interactions, "health", "--target", "127.0.0.1:1", "--deadline", "1"], capture_output=True, text=True
    )
    assert probe.returncode == 1 and "UNAVAILABLE" in probe.stderr
    # Parquet is an optional extra: without pyarrow, the command says how to get it (a usage error).
    parquet = subprocess.run(
        [interactions, "export", "training", "--out", tmp_path / "t.parquet"], capture_output=True, text=True
    )
    assert parquet.returncode == 2 and "interactions-client[parquet]" in parquet.stderr
