"""TLS and mutual TLS against the real server, with certificates made here:
plaintext is refused, the CA is trusted, client certificates are checked,
and a rotated certificate is served without a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interactions_client import InteractionsClient, TlsConfig, UnavailableError
from interactions_server.server import App, StartupError
from tests.certs import Authority
from tests.support import StartServer
from tests.support import cli as server_cli
from tests.test_cli import cli


async def serving(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """One health check on a fresh channel: True when SERVING, False when the call failed."""
    channel = (
        grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def ca() -> Authority:
    return Authority("interactions test CA")


@pytest.fixture
async def tls_server(tmp_path: Path, ca: Authority, start_server: StartServer) -> App:
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    return await start_server(tls_cert=cert, tls_key=key)


async def test_plaintext_against_tls_fails_and_tls_with_the_ca_works(tls_server: App, ca: Authority) -> None:
    assert not await serving(tls_server.address, None)
    assert not await serving(tls_server.address, grpc.ssl_channel_credentials(Authority("another CA").pem))
    assert await serving(tls_server.address, grpc.ssl_channel_credentials(ca.pem))

    async with InteractionsClient(tls_server.address, tls=TlsConfig(root_certificates=ca.pem)) as client:
        assert await client.health()
    async with InteractionsClient(tls_server.address, tls=False, deadline=2) as client:
        with pytest.raises(UnavailableError):
            await client.health()


async def test_the_cli_with_tls_and_ca_cert(tls_server: App, ca: Authority, tmp_path: Path) -> None:
    ca_file = ca.write(tmp_path, "ca")
    run = await cli("health", "--target", tls_server.address, "--tls", "--ca-cert", str(ca_file))
    assert (run.status, run.stdout) == (0, "SERVING\n"), run.stderr
    plain = await cli("health", "--target", tls_server.address, "--deadline", "2")
    assert plain.status == 1


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    tmp_path: Path, ca: Authority, start_server: StartServer
) -> None:
    clients_ca = Authority("clients CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    server = await start_server(tls_cert=cert, tls_key=key, tls_client_ca=clients_ca.write(tmp_path, "clients-ca"))

    good = clients_ca.issue("web-frontend", server=False)
    stranger = Authority("another CA").issue("web-frontend", server=False)
    assert not await serving(server.address, grpc.ssl_channel_credentials(ca.pem))  # no client certificate
    assert not await serving(server.address, grpc.ssl_channel_credentials(ca.pem, stranger.key, stranger.cert))
    assert await serving(server.address, grpc.ssl_channel_credentials(ca.pem, good.key, good.cert))

    # The client library and the CLI with a client certificate.
    tls = TlsConfig(root_certificates=ca.pem, certificate_chain=good.cert, private_key=good.key)
    async with InteractionsClient(server.address, tls=tls) as client:
        assert await client.health()
    client_cert, client_key = good.write(tmp_path, "client")
    run = await cli(
        "health",
        "--target",
        server.address,
        "--ca-cert",
        str(ca.write(tmp_path, "ca")),
        "--client-cert",
        str(client_cert),
        "--client-key",
        str(client_key),
    )
    assert run.status == 0, run.stderr


async def test_a_rotated_certificate_is_served_without_a_restart(
    tmp_path: Path, ca: Authority, start_server: StartServer
) -> None:
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    server = await start_server(tls_cert=cert, tls_key=key)
    assert await serving(server.address, grpc.ssl_channel_credentials(ca.pem))

    new_ca = Authority("next CA")
    new_ca.issue("localhost", server=True).write(tmp_path, "server")
    stat = os.stat(cert)  # a rename within one clock tick could keep the mtime: move it on
    os.utime(cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert await serving(server.address, grpc.ssl_channel_credentials(new_ca.pem))
    assert not await serving(server.address, grpc.ssl_channel_credentials(ca.pem))


async def test_unreadable_tls_files_fail_start_up_with_one_line(tmp_path: Path, start_server: StartServer) -> None:
    pem = Authority("CA").issue("localhost", server=True)
    cert, key = pem.write(tmp_path, "server")
    with pytest.raises(StartupError, match=r"^TLS: cannot read .*missing\.key: No such file or directory$"):
        await start_server(tls_cert=cert, tls_key=tmp_path / "missing.key")
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(StartupError, match=r"junk\.crt is not a PEM file"):
        await start_server(tls_cert=tmp_path / "junk.crt", tls_key=key)
    with pytest.raises(StartupError, match="--tls-cert and --tls-key go together"):
        await start_server(tls_cert=cert)
    with pytest.raises(StartupError, match="--tls-client-ca needs"):
        await start_server(tls_client_ca=cert)


async def test_a_broken_rotation_keeps_the_current_certificate(
    tmp_path: Path, ca: Authority, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    server = await start_server(tls_cert=cert, tls_key=key)
    write_bytes(cert, b"half-written")
    with caplog.at_level(logging.ERROR, logger="interactions_server.tls"):
        for _ in range(3):  # three handshakes, one error logged
            assert await serving(server.address, grpc.ssl_channel_credentials(ca.pem))
    assert [r.getMessage() for r in caplog.records if r.name == "interactions_server.tls"] == [
        f"TLS files not reloaded, the current certificate stays in use: {cert} is not a PEM file"
    ]
    new_ca = Authority("next CA")
    new_ca.issue("localhost", server=True).write(tmp_path, "server")
    assert await serving(server.address, grpc.ssl_channel_credentials(new_ca.pem))


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def other_key_same_name(ca: Authority, directory: Path, name: str) -> Path:
    """Replaces NAME.crt with a certificate for another key (NAME.key stays): a rotation half done."""
    cert, _ = ca.issue("localhost", server=True).write(directory, f"{name}-next")
    os.replace(cert, directory / f"{name}.crt")
    return directory / f"{name}.crt"


async def test_a_certificate_without_its_key_is_refused_with_one_error(
    tmp_path: Path, ca: Authority, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    server = await start_server(tls_cert=cert, tls_key=key)
    before = await served_certificate(server.port)
    new_ca = Authority("next CA")
    other_key_same_name(new_ca, tmp_path, "server")
    with caplog.at_level(logging.INFO, logger="interactions_server.tls"):
        for _ in range(3):  # three handshakes: the old certificate each time, one error logged
            assert await serving(server.address, grpc.ssl_channel_credentials(ca.pem))
    assert await served_certificate(server.port) == before
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "interactions_server.tls"]
    assert messages == [
        (
            "ERROR",
            f"TLS files not reloaded, the current certificate stays in use: the certificate {cert} does not "
            f"match the private key {key} (replace both, renaming each into place)",
        )
    ]
    # The key follows: the pair is served.
    new_ca.issue("localhost", server=True).write(tmp_path, "server")
    assert await serving(server.address, grpc.ssl_channel_credentials(new_ca.pem))


async def test_a_mismatched_pair_at_start_up_is_one_line(
    tmp_path: Path, ca: Authority, start_server: StartServer
) -> None:
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    other_key_same_name(ca, tmp_path, "server")
    with pytest.raises(StartupError, match=r"^TLS: the certificate .*server\.crt does not match the private key"):
        await start_server(tls_cert=cert, tls_key=key)


async def served_certificate(port: int) -> bytes:
    """The DER certificate the server presents now (a raw TLS handshake, no verification)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der
    finally:
        writer.close()


async def test_the_json_log_stays_json_through_a_bad_rotation_and_failed_handshakes(
    tmp_path: Path, ca: Authority, database_url: str
) -> None:
    """gRPC core prints its own lines on stderr ("Invalid private key", failed
    handshakes of plaintext clients): silenced by default (GRPC_VERBOSITY),
    so that every line of the server's log is one JSON object."""
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    async with server_cli(
        "--listen", "127.0.0.1:0", "--database-url", database_url, "--log-format", "json",
        "--tls-cert", str(cert), "--tls-key", str(key),
    ) as server:  # fmt: skip
        address = (await server.wait_for_line(r'"listening on (127\.0\.0\.1:\d+)"'))[1]
        other_key_same_name(Authority("next CA"), tmp_path, "server")
        for _ in range(3):
            assert await serving(address, grpc.ssl_channel_credentials(ca.pem))
            assert not await serving(address, None)  # a plaintext client: a failed handshake
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0
    lines = [json.loads(line) for line in server.log]  # every line is JSON
    errors = [line["message"] for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1 and "does not match the private key" in errors[0], errors
    assert not any("reloaded" in line["message"] and line["level"] == "INFO" for line in lines)
