"""The processes under test: the real server (the `interactions-server`
command) and the no-op RPC ceiling (bench.noop_server), each started as a
separate process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio

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
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def interactions_server(cls, database_url: str, log_dir: Path) -> ServiceProcess:
        command = [*server_command(), "--database-url", database_url, "--log-level", "WARNING"]
        return cls("interactions-server", command, log_dir / "server.log")

    @classmethod
    def noop_server(cls, log_dir: Path) -> ServiceProcess:
        return cls("no-op server", [sys.executable, "-m", "bench.noop_server"], log_dir / "noop-server.log")

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    async def start(self, *, check_health: bool, timeout: float = 60.0) -> None:
        """Starts the process and waits until it serves: health SERVING, or
        for a server without health, a channel that connects."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTERACTIONS_")}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            async with asyncio.timeout(timeout):
                while not await self._serving(check_health):
                    if self._process.poll() is not None:
                        raise RuntimeError(f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}")
                    await asyncio.sleep(0.2)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.name} did not serve within {timeout:.0f} s:\n{self.log_tail()}") from None

    async def _serving(self, check_health: bool) -> bool:
        if check_health:
            async with InteractionsClient(self.target, deadline=1.0) as client:
                try:
                    return await client.health()
                except InteractionsError:
                    return False
        async with grpc.aio.insecure_channel(self.target) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 1.0)
            except TimeoutError:
                return False
            return True

    async def stop(self, timeout: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)
        except TimeoutError:
            process.kill()
            await asyncio.to_thread(process.wait)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
