"""Bearer tokens and scopes against the real server: every RPC of every
served service refuses a missing token and a token without its scope, before
anything reaches the database; event_types restrictions; SIGHUP reloads;
health stays open, reflection needs a token or is off."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from interactions_client import (
    InteractionsClient,
    PermissionDeniedError,
    SyncInteractionsClient,
    UnauthenticatedError,
)
from interactions_client.access import ADMIN, ANY_TOKEN, GRANTABLE_SCOPES, MissingScopeError, required_scopes
from interactions_client.v1 import analytics_service_pb2 as analytics_pb
from interactions_client.v1 import interaction_service_pb2 as isv
from interactions_client.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server import auth, rpc
from interactions_server.ingest import Ingestor
from interactions_server.server import App, StartupError
from interactions_server.services import analytics
from tests.events import valid_event
from tests.support import StartServer, cli, field_violations
from tests.test_cli import cli as client_cli

VIEW = EventType.EVENT_TYPE_VIEW
# name -> (secret, scopes, event_types)
TOKENS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "writer": ("writer-secret", ["events:write"], None),
    "reader": ("reader-secret", ["state:read"], None),
    "analyst": ("analyst-secret", ["analytics:read"], None),
    "linker": ("linker-secret", ["identity:write"], None),
    "operator": ("operator-secret", ["admin"], None),
    "subscriber": ("subscriber-secret", ["events:subscribe"], None),
    "nobody": ("nobody-secret", [], None),
    "web": ("web-secret", ["events:write"], ["view", "search"]),
}


def tokens_toml(tokens: dict[str, tuple[str, list[str], list[str] | None]]) -> str:
    parts = []
    for name, (secret, scopes, types) in tokens.items():
        lines = ["[[token]]", f'name = "{name}"', f'sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"']
        lines.append(f"scopes = {scopes!r}".replace("'", '"'))
        if types is not None:
            lines.append(f"event_types = {types!r}".replace("'", '"'))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_tokens(path: Path, tokens: dict[str, tuple[str, list[str], list[str] | None]], extra: str = "") -> None:
    path.write_text(tokens_toml(tokens) + extra)


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    """The metadata of token `name` (a name not in TOKENS sends a secret the server does not know)."""
    secret = TOKENS[name][0] if name in TOKENS else f"{name}-secret"
    return (("authorization", f"Bearer {secret}"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_toml(TOKENS))
    return path


@pytest.fixture
async def secured(start_server: StartServer, tokens_file: Path) -> App:
    return await start_server(auth_tokens=tokens_file)


@pytest.fixture
async def secured_channel(secured: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(secured.address) as channel:
        yield channel


def token_without(scope: str) -> str:
    """A token that does not hold `scope`."""
    return next(name for name, (_, scopes, _) in TOKENS.items() if scope not in scopes and ADMIN not in scopes)


def token_with(scope: str) -> str:
    return next(name for name, (_, scopes, _) in TOKENS.items() if scope in scopes or scope == ANY_TOKEN)


async def refused_stream(call: Any, request: Any) -> grpc.StatusCode:
    """Writes one request on a bidi call the server refuses and reads; the
    status it ended with. (The write itself can fail, with a generic error,
    when the refusal has already ended the call.)"""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.write(request)
        await call.read()
    code: grpc.StatusCode = await call.code()
    return code


async def call(
    channel: grpc.aio.Channel,
    service: ServiceDescriptor,
    method: MethodDescriptor,
    token: str | None,
    *,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> grpc.StatusCode:
    """Calls the method with an empty request (an empty stream for a client
    stream) and `token`'s metadata (or `metadata`); returns the status code it
    ends with (a response stream: OK once its first response came, as a
    subscription never ends)."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    multicallable: Callable[..., Any] = kind(
        path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString
    )
    if metadata is None and token:
        metadata = bearer(token)
    request: Any = iter([]) if method.client_streaming else request_class()
    try:
        result = multicallable(request, metadata=metadata, timeout=10)
        if method.server_streaming:
            async for _ in result:
                break
            result.cancel()
        else:
            await result
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_every_served_rpc_checks_its_token_and_scope(secured: App, secured_channel: grpc.aio.Channel) -> None:
    required = required_scopes(secured.served_services)
    assert len(required) >= 8  # InteractionService, UserStateService, AdminService (and more once served)
    for service in secured.served_services:
        for method in service.methods:
            scope = required[f"/{service.full_name}/{method.name}"]
            what = f"{service.name}.{method.name} ({scope or 'any token'})"
            assert await call(secured_channel, service, method, None) == grpc.StatusCode.UNAUTHENTICATED, what
            assert await call(secured_channel, service, method, "unknown") == grpc.StatusCode.UNAUTHENTICATED, what
            if scope != ANY_TOKEN:
                denied = await call(secured_channel, service, method, token_without(scope))
                assert denied == grpc.StatusCode.PERMISSION_DENIED, what
            for allowed in (token_with(scope), "operator"):  # admin holds every scope
                code = await call(secured_channel, service, method, allowed)
                assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), what


async def test_every_served_rpc_refuses_more_than_one_authorization_header(
    secured: App, secured_channel: grpc.aio.Channel
) -> None:
    """Only one bearer token per call: with two, which one counts would depend
    on who reads the headers (a proxy, a logger, this server)."""
    for service in secured.served_services:
        for method in service.methods:
            for first, second in (("operator", "operator"), ("operator", "nobody"), ("unknown", "operator")):
                metadata = bearer(first) + bearer(second)
                code = await call(secured_channel, service, method, None, metadata=metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method.name, first, second)


async def test_the_scopes_cover_every_service_the_server_answers(
    secured: App, secured_channel: grpc.aio.Channel
) -> None:
    """Every service reflection lists, but health and reflection, has its scopes
    checked (served_services), so none can be registered around the check."""
    call = reflection_pb2_grpc.ServerReflectionStub(secured_channel).ServerReflectionInfo(metadata=bearer("nobody"))
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = {s.name for s in (await call.read()).list_services_response.service}
    await call.done_writing()
    assert listed - {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} == {
        s.full_name for s in secured.served_services
    }
    # A method no scope lists needs admin (fail closed), reflection any token.
    interceptor = rpc.TokenAuth(secured.config.auth_tokens)  # type: ignore[arg-type]
    assert interceptor.check("/x.Unlisted/Call", bearer("writer")) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "token 'writer' lacks the scope 'admin' for /x.Unlisted/Call",
    )
    assert isinstance(interceptor.check("/x.Unlisted/Call", bearer("operator")), auth.Caller)


async def test_a_refused_call_writes_and_deletes_nothing(
    secured: App, secured_channel: grpc.aio.Channel, database_url: str
) -> None:
    stub = InteractionServiceStub(secured_channel)
    events = [valid_event(EventType.EVENT_TYPE_ADD_TO_CART), valid_event(EventType.EVENT_TYPE_VIEW)]
    for metadata in (None, bearer("reader"), (("authorization", "Bearer writer-secretx"),)):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.LogEvents(isv.LogEventsRequest(events=events), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.LogEvent(isv.LogEventRequest(event=events[0]), metadata=metadata)
        code = await refused_stream(stub.StreamEvents(metadata=metadata), isv.StreamEventsRequest(events=events))
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    connection = await asyncpg.connect(database_url)
    try:
        counts = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM events) AS e, (SELECT count(*) FROM event_keys) AS k,"
            " (SELECT count(*) FROM cart_lines) AS c"
        )
        assert tuple(counts) == (0, 0, 0)
        # And a refused deletion deletes nothing.
        await stub.LogEvents(isv.LogEventsRequest(events=events), metadata=bearer("writer"))
        async with InteractionsClient(secured.address, token=TOKENS["writer"][0]) as client:
            with pytest.raises(PermissionDeniedError):
                await client.delete_user_data("u1")
        assert await connection.fetchval("SELECT count(*) FROM events WHERE user_id = 'u1'") == 2
    finally:
        await connection.close()


async def test_the_servicer_is_never_entered_on_a_refused_call(
    secured: App, secured_channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered: list[str] = []

    async def write(*args: Any, **kwargs: Any) -> None:
        entered.append("write")
        raise AssertionError("reached the ingestor")

    monkeypatch.setattr(Ingestor, "write", write)
    stub = InteractionServiceStub(secured_channel)
    request = isv.StreamEventsRequest(sequence=1, events=[valid_event(EventType.EVENT_TYPE_VIEW)])
    assert await refused_stream(stub.StreamEvents(metadata=bearer("reader")), request) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert entered == []


async def test_event_types_restrict_unary_batch_and_stream(secured: App, secured_channel: grpc.aio.Channel) -> None:
    stub = InteractionServiceStub(secured_channel)
    view, click, search = (
        valid_event(EventType.EVENT_TYPE_VIEW),
        valid_event(EventType.EVENT_TYPE_CLICK),
        valid_event(EventType.EVENT_TYPE_SEARCH),
    )
    # Unary: INVALID_ARGUMENT naming event.event_type; another caller's identical
    # concurrent call (sharing the group commit) is not affected.
    refused, accepted = await asyncio.gather(
        stub.LogEvent(isv.LogEventRequest(event=click), metadata=bearer("web")),
        stub.LogEvent(isv.LogEventRequest(event=valid_event(EventType.EVENT_TYPE_CLICK)), metadata=bearer("writer")),
        return_exceptions=True,
    )
    assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused) == {"event.event_type": auth.TYPE_NOT_ALLOWED}
    assert isinstance(accepted, isv.LogEventResponse)
    assert not (await stub.LogEvent(isv.LogEventRequest(event=view), metadata=bearer("web"))).duplicate

    # Batch: the others are written.
    batch = [valid_event(EventType.EVENT_TYPE_VIEW), valid_event(EventType.EVENT_TYPE_CLICK), search]
    response = await stub.LogEvents(isv.LogEventsRequest(events=batch), metadata=bearer("web"))
    assert response.accepted_count == 2
    assert [(r.index, [(v.field, v.description) for v in r.violations]) for r in response.rejected] == [
        (1, [("event_type", auth.TYPE_NOT_ALLOWED)])
    ]

    # Stream: the same, per batch.
    stream = stub.StreamEvents(metadata=bearer("web"))
    await stream.write(
        isv.StreamEventsRequest(
            sequence=7, events=[valid_event(EventType.EVENT_TYPE_PURCHASE), valid_event(EventType.EVENT_TYPE_VIEW)]
        )
    )
    answer = await stream.read()
    await stream.done_writing()
    assert (answer.sequence, answer.accepted_count) == (7, 1)
    assert [(r.index, r.violations[0].field) for r in answer.rejected] == [(0, "event_type")]
    logged = await secured.pool.fetchval("SELECT count(*) FROM events WHERE event_type IN ('click', 'purchase')")
    assert logged == 1  # the writer's click only


async def test_the_client_sends_its_token_and_maps_refusals(secured: App) -> None:
    async with InteractionsClient(secured.address) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.get_cart("u1")
    async with InteractionsClient(secured.address, token=TOKENS["writer"][0]) as writer:
        assert not (await writer.view("u1", "p1")).duplicate
        async with writer.stream(batch_size=2) as streamer:
            for product in ("p2", "p3", "p4"):
                await streamer.send(valid_event(EventType.EVENT_TYPE_VIEW, product_id=product))
        assert streamer.totals.accepted == 3
        with pytest.raises(PermissionDeniedError):
            await writer.get_cart("u1")
        assert await writer.health()

    def sync_calls() -> None:
        with SyncInteractionsClient(secured.address, token=TOKENS["reader"][0]) as reader:
            assert reader.get_cart("u1") == []
            with pytest.raises(PermissionDeniedError):
                reader.view("u1", "p1")
        with SyncInteractionsClient(secured.address, token=TOKENS["writer"][0]) as writer:
            with writer.stream() as streamer:
                streamer.send(valid_event(EventType.EVENT_TYPE_VIEW))
            assert streamer.totals.accepted == 1
            with pytest.raises(PermissionDeniedError):
                writer.delete_user_data("u1", dry_run=True)
        with SyncInteractionsClient(secured.address, token=TOKENS["operator"][0]) as operator:
            assert operator.delete_user_data("u1", dry_run=True).events_deleted == 5

    await asyncio.to_thread(sync_calls)


async def test_the_cli_takes_a_token_option_or_environment_variable(secured: App) -> None:
    target = ("--target", secured.address)
    assert (await client_cli("cart", "u1", *target)).status == 1
    run = await client_cli("cart", "u1", *target, "--token", TOKENS["reader"][0])
    assert (run.status, run.stdout) == (0, "(none)\n"), run.stderr
    run = await client_cli("cart", "u1", *target, env={"INTERACTIONS_TOKEN": TOKENS["writer"][0]})
    assert run.status == 1 and "PERMISSION_DENIED" in run.stderr


async def test_health_is_open_and_reflection_needs_a_token(secured: App, secured_channel: grpc.aio.Channel) -> None:
    health = await health_pb2_grpc.HealthStub(secured_channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    async def list_services(metadata: Any) -> list[str]:
        call = reflection_pb2_grpc.ServerReflectionStub(secured_channel).ServerReflectionInfo(metadata=metadata)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
        return [s.name for s in response.list_services_response.service]

    call = reflection_pb2_grpc.ServerReflectionStub(secured_channel).ServerReflectionInfo()
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    assert await refused_stream(call, request) == grpc.StatusCode.UNAUTHENTICATED
    assert "interactions.v1.AdminService" in await list_services(bearer("nobody"))  # any valid token


async def test_no_reflection_turns_it_off(start_server: StartServer, tokens_file: Path) -> None:
    for overrides in ({}, {"auth_tokens": tokens_file}):
        app = await start_server(reflection=False, **overrides)
        async with grpc.aio.insecure_channel(app.address) as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(metadata=bearer("operator"))
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            assert await refused_stream(call, request) == grpc.StatusCode.UNIMPLEMENTED


async def test_without_tokens_the_server_is_open_and_says_so(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="interactions_server"):
        app = await start_server()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["no --auth-tokens: the server is open, any caller may call every RPC"]
    async with InteractionsClient(app.address) as client:
        assert await client.get_cart("u1") == []


async def test_reload_revokes_and_a_bad_file_keeps_the_tokens(
    secured: App, tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with InteractionsClient(secured.address, token=TOKENS["reader"][0]) as reader:
        assert await reader.get_cart("u1") == []
        write_tokens(tokens_file, {k: v for k, v in TOKENS.items() if k != "reader"})
        assert secured.reload_tokens()
        with pytest.raises(UnauthenticatedError):
            await reader.get_cart("u1")

    write_tokens(tokens_file, TOKENS, extra='[[token]]\nname = "x"\nsha256 = "00"\nscopes = []\n')
    with caplog.at_level(logging.ERROR, logger="interactions_server.auth"):
        assert not secured.reload_tokens()
    assert "previous tokens stay in force" in caplog.text
    async with InteractionsClient(secured.address, token=TOKENS["writer"][0]) as writer:
        await writer.view("u1", "p1")  # the old tokens are still in force
    async with InteractionsClient(secured.address, token=TOKENS["reader"][0]) as reader:
        with pytest.raises(UnauthenticatedError):
            await reader.get_cart("u1")
    for secret, _, _ in TOKENS.values():  # neither a secret nor its hash is ever logged
        assert secret not in caplog.text and hashlib.sha256(secret.encode()).hexdigest() not in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[[token]]\nname = "a"\nsha256 = "{h}"\nscopes = ["events:read"]\n', "unknown scope 'events:read'"),
        (
            '[[token]]\nname = "a"\nsha256 = "{h}"\nscopes = []\nevent_types = ["viewed"]\n',
            "unknown event type 'viewed'",
        ),
        ('[[token]]\nname = "a"\nsha256 = "abc"\nscopes = []\n', "`sha256` must be the 64 hex digits"),
        ('[[token]]\nname = "a"\nsha256 = "{h}"\nscope = []\n', "unknown key(s) ['scope']"),
        ('[[token]]\nsha256 = "{h}"\nscopes = []\n', "`name` is required"),
        ("token = 3\n", "has no [[token]] tables"),
        ("[[token]\n", "is not valid TOML"),
    ],
)
async def test_a_bad_tokens_file_stops_start_up_naming_the_problem(
    start_server: StartServer, tmp_path: Path, content: str, message: str
) -> None:
    digest = hashlib.sha256(b"s").hexdigest()
    path = tmp_path / "tokens.toml"
    path.write_text(content.replace("{h}", digest))
    with pytest.raises(StartupError) as failed:
        await start_server(auth_tokens=path)
    assert message in str(failed.value) and digest not in str(failed.value)
    with pytest.raises(StartupError, match="cannot read the tokens file"):
        await start_server(auth_tokens=tmp_path / "missing.toml")


def test_an_rpc_without_required_scope_fails() -> None:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    with pytest.raises(MissingScopeError, match=r"grpc\.health\.v1\.Health\.Check declares no"):
        required_scopes([health])
    assert {
        "events:write",
        "state:read",
        "analytics:read",
        "identity:write",
        "admin",
        "events:subscribe",
    } == GRANTABLE_SCOPES


def test_the_hash_helper(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("writer-secret\n"))
    assert auth.main(["hash"]) == 0
    assert capsys.readouterr().out == hashlib.sha256(b"writer-secret").hexdigest() + "\n"
    assert auth.main(["new"]) == 0
    token_line, digest_line = capsys.readouterr().out.splitlines()
    token = token_line.split()[1]
    assert digest_line.split()[1] == hashlib.sha256(token.encode()).hexdigest()


# --- the interceptor on every streaming shape -------------------------------------


async def test_the_interceptor_keeps_every_streaming_shape(tokens_file: Path) -> None:
    """Refused before the handler, caller visible inside it, for unary and
    streaming requests and responses alike (grpc #37208: aio unary-stream)."""
    interceptor = rpc.TokenAuth(tokens_file)
    interceptor.require({f"/t.S/{name}": "state:read" for name in ("UU", "US", "SU", "SS")})
    entered: list[str] = []

    def caller() -> bytes:
        current = auth.current_caller()
        return (current.name if current else "").encode()

    async def uu(request: bytes, context: Any) -> bytes:
        entered.append("UU")
        return caller()

    async def us(request: bytes, context: Any) -> AsyncIterator[bytes]:
        entered.append("US")
        for _ in range(2):
            yield caller()

    async def su(requests: AsyncIterator[bytes], context: Any) -> bytes:
        entered.append("SU")
        return b"".join([r async for r in requests]) + caller()

    async def ss(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        entered.append("SS")
        async for request in requests:
            yield request + caller()

    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.S",
                {
                    "UU": grpc.unary_unary_rpc_method_handler(uu),
                    "US": grpc.unary_stream_rpc_method_handler(us),
                    "SU": grpc.stream_unary_rpc_method_handler(su),
                    "SS": grpc.stream_stream_rpc_method_handler(ss),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def run(name: str, token: str | tuple[str, str] | None) -> Any:
                if isinstance(token, tuple):
                    metadata: Any = bearer(token[0]) + bearer(token[1])
                else:
                    metadata = bearer(token) if token else None
                if name == "UU":
                    return await channel.unary_unary("/t.S/UU")(b"", metadata=metadata)
                if name == "US":
                    return [r async for r in channel.unary_stream("/t.S/US")(b"", metadata=metadata)]
                if name == "SU":
                    return await channel.stream_unary("/t.S/SU")(iter([b"a:"]), metadata=metadata)
                return [r async for r in channel.stream_stream("/t.S/SS")(iter([b"a:"]), metadata=metadata)]

            for name in ("UU", "US", "SU", "SS"):
                for token, code in (
                    (None, grpc.StatusCode.UNAUTHENTICATED),
                    ("writer", grpc.StatusCode.PERMISSION_DENIED),
                    (("reader", "reader"), grpc.StatusCode.UNAUTHENTICATED),  # two authorization headers
                    (("reader", "nobody"), grpc.StatusCode.UNAUTHENTICATED),
                    (("unknown", "reader"), grpc.StatusCode.UNAUTHENTICATED),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await run(name, token)
                    assert refused.value.code() == code, (name, token)
                    if isinstance(token, tuple):
                        assert "more than one authorization header" in (refused.value.details() or "")
            assert entered == []
            assert await run("UU", "reader") == b"reader"
            assert await run("US", "operator") == [b"operator", b"operator"]
            assert await run("SU", "reader") == b"a:reader"
            assert await run("SS", "reader") == [b"a:reader"]
            assert entered == ["UU", "US", "SU", "SS"]
    finally:
        await server.stop(None)


# --- SIGHUP to a real interactions-server process -----------------------------------


async def test_sighup_revokes_a_token_in_a_running_server(database_url: str, tokens_file: Path) -> None:
    async with cli(
        "--listen", "127.0.0.1:0", "--database-url", database_url, "--auth-tokens", str(tokens_file)
    ) as server:
        address = (await server.wait_for_line(r"listening on (\S+)"))[1]
        async with InteractionsClient(address, token=TOKENS["reader"][0]) as reader:
            assert await reader.get_cart("u1") == []
            write_tokens(tokens_file, {k: v for k, v in TOKENS.items() if k != "reader"})
            server.process.send_signal(signal.SIGHUP)
            await server.wait_for_line("tokens file reloaded")
            with pytest.raises(UnauthenticatedError):
                await reader.get_cart("u1")
        server.process.terminate()
        assert await server.finish() == 0
    log = "".join(server.log)
    assert "reader-secret" not in log and hashlib.sha256(b"reader-secret").hexdigest() not in log


async def test_the_server_command_reports_a_bad_tokens_file_in_one_line(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[token]]\nname = "a"\nsha256 = "0"\nscopes = ["root"]\n')
    async with cli("--listen", "127.0.0.1:0", "--database-url", database_url, "--auth-tokens", str(path)) as server:
        assert await server.finish() == 2  # an operator error
    errors = [line for line in server.log if " ERROR " in line]
    assert len(errors) == 1 and "sha256" in errors[0]
    assert "Traceback" not in "".join(server.log)


def test_the_security_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from interactions_server.cli import build_parser

    defaults = build_parser().parse_args([])
    assert (defaults.tls_cert, defaults.tls_key, defaults.tls_client_ca, defaults.auth_tokens) == (None,) * 4
    assert defaults.reflection
    for name, value in {
        "TLS_CERT": "s.crt",
        "TLS_KEY": "s.key",
        "TLS_CLIENT_CA": "ca.crt",
        "AUTH_TOKENS": "t.toml",
        "NO_REFLECTION": "1",
    }.items():
        monkeypatch.setenv(f"INTERACTIONS_{name}", value)
    args = build_parser().parse_args([])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_tokens) == tuple(
        map(Path, ("s.crt", "s.key", "ca.crt", "t.toml"))
    )
    assert not args.reflection
    flags = build_parser().parse_args(["--tls-cert", "a", "--tls-key", "b", "--auth-tokens", "c", "--no-reflection"])
    assert (flags.tls_cert, flags.auth_tokens, flags.reflection) == (Path("a"), Path("c"), False)


async def test_a_reload_ends_the_open_streams_of_a_revoked_token(
    secured: App, secured_channel: grpc.aio.Channel, tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoked token's open StreamEvents gets UNAUTHENTICATED at its next
    batch, which is not written; its open export ends before its next response."""
    monkeypatch.setattr(analytics, "ROWS_PER_RESPONSE", 1)
    stream = InteractionServiceStub(secured_channel).StreamEvents(metadata=bearer("writer"))
    for sequence in (1, 2):
        events = [valid_event(VIEW, user_id="before") for _ in range(1_000)]
        await stream.write(isv.StreamEventsRequest(sequence=sequence, events=events))
        assert (await stream.read()).accepted_count == 1_000
    # More responses than flow control lets the server send ahead of the reader.
    analyst = AnalyticsServiceStub(secured_channel)
    export = analyst.ExportEvents(analytics_pb.ExportEventsRequest(), metadata=bearer("analyst"))
    assert len((await export.read()).events) == 1
    # Another token's stream goes on.
    web = InteractionServiceStub(secured_channel).StreamEvents(metadata=bearer("web"))

    write_tokens(tokens_file, {k: v for k, v in TOKENS.items() if k not in ("writer", "analyst")})
    assert secured.reload_tokens()

    await stream.write(isv.StreamEventsRequest(sequence=2, events=[valid_event(VIEW, user_id="after")]))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream.read()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    exported = 1
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:  # the responses sent before the reload, then the end
            response = await export.read()
            assert response is not grpc.aio.EOF, "the export ran to its end"
            exported += 1
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert exported < 2_000
    await web.write(isv.StreamEventsRequest(sequence=1, events=[valid_event(VIEW, user_id="web")]))
    assert (await web.read()).accepted_count == 1
    await web.done_writing()
    users = await secured.pool.fetch("SELECT DISTINCT user_id FROM events ORDER BY 1")
    assert [r[0] for r in users] == ["before", "web"]
