"""The processes under test: the real server (the `interactions-server`
command) and the no-op RPC ceiling (bench.noop_server), each started as a
separate process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from interactions_client import InteractionsClient
from interactions_client.errors import InteractionsError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def server_command() -> list[str]:
    """The installed `interactions-server` script (the one beside this Python first)."""
    beside = Path(sys.executable).parent / "interactions-server"
    found = str(beside) if beside.exists() else shutil.which("interactions-server")
    if found is None:
        raise RuntimeError("the interactions-server command is not installed (pip install -e .)")
    return [found]


class ServiceProcess:
    """A server process whose log goes to a file; `await start()`, `await stop()`."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.command = [*command, "--listen", self.target]
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    def interactions_server(
        cls, database_url: str, log_dir: Path, *, workers: int = 1, extra: Sequence[str] = (), name: str = "server"
    ) -> ServiceProcess:
        command = [*server_command(), "--database-url", database_url, "--log-level", "WARNING", *extra]
        if workers > 1:
            command += ["--workers", str(workers)]
        return cls("interactions-server", command, log_dir / f"{name}.log")

    @classmethod
    def noop_server(cls, log_dir: Path) -> ServiceProcess:
        return cls("no-op server", [sys.executable, "-m", "bench.noop_server"], log_dir / "noop-server.log")

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    async def start(self, within: float = 60.0) -> None:
        """Starts the process and waits (at most `within` seconds) until its health check answers SERVING."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTERACTIONS_")}
        with self.log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(*self.command, stdout=log, stderr=log, env=env)
        self._process = process
        try:
            async with asyncio.timeout(within):
                while not await self._serving():
                    if process.returncode is not None:
                        raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{self.log_tail()}")
                    await asyncio.sleep(0.2)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.name} did not serve within {within:.0f} s:\n{self.log_tail()}") from None

    async def _serving(self) -> bool:
        async with InteractionsClient(self.target, deadline=1.0) as client:
            try:
                return await client.health()
            except InteractionsError:
                return False

    async def stop(self, within: float = 20.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL after `within` seconds."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), within)
        except TimeoutError:
            process.kill()
            await process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
