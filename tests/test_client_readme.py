"""The example in client/README.md runs against the real server and does what it says."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from interactions_server.server import App

README = Path(__file__).resolve().parents[1] / "client" / "README.md"


async def test_readme_example_logs_every_type_and_reads_the_cart(
    server: App, capsys: pytest.CaptureFixture[str]
) -> None:
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert example is not None
    code = example.group(1).replace("asyncio.run(main())", "")  # this test's event loop runs it
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    main: Callable[[str], Coroutine[Any, Any, None]] = namespace["main"]
    await main(server.address)

    assert 'product_id: "sku-42"' in capsys.readouterr().out
    assert await server.pool.fetchval("SELECT count(*) FROM events WHERE user_id = 'user-1'") == 19
    names = {r["event_type"] for r in await server.pool.fetch("SELECT DISTINCT event_type FROM events")}
    assert len(names) == 18  # every seed type
    cart = await server.pool.fetch("SELECT product_id, quantity FROM user_cart WHERE user_id = 'user-1'")
    assert [(r["product_id"], r["quantity"]) for r in cart] == [("sku-42", 3)]
