"""The read-only JSON API: tickets with their deadlines and incident reviews, token-guarded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.app import demo_config
from support.mailer import make_mail, send
from support.sink import SmtpSink

from gateway.config import parse_settings
from gateway.daemon import App
from gateway.mail.transport import SmtpTransport

TOKEN = "api-token-0123456789abcdef"


@pytest.fixture
async def api_app(tmp_path: Path, db_url: str, sink: SmtpSink, clock: Any) -> AsyncIterator[App]:
    data = demo_config(tmp_path, db_url, http={"host": "127.0.0.1", "port": 0,
                                               "api_token": TOKEN})
    settings = parse_settings(data, base_dir=tmp_path, environ={})
    app = App(settings, clock=clock, transport=SmtpTransport(
        "127.0.0.1", sink.port, starttls=False, username="", password="", timeout=5))
    await app.start()
    yield app
    await app.stop()


async def get(app: App, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, client.get(
            f"http://127.0.0.1:{app.http.port}{path}", headers=headers) as response:
        return response.status, await response.json()


async def test_ticket_with_deadlines_over_http(api_app: App) -> None:
    _, text = await send(api_app.channels[0].port,  # type: ignore[attr-defined]
                         make_mail("Over the API"))
    number = text.split()[-1]
    status, data = await get(api_app, f"/api/tickets/{number}")
    assert status == 200
    assert data["number"] == number and data["subject"] == "Over the API"
    assert set(data["deadlines"]) >= {"first_response_due", "update_due", "solution_due"}
    status, sla = await get(api_app, f"/api/tickets/{number}/sla")
    assert status == 200 and isinstance(sla, dict)
    status, reviews = await get(api_app, f"/api/incidents/{number}/reviews")
    assert status == 200 and reviews == []  # not a major incident: no review
    assert (await get(api_app, "/api/tickets/1"))[0] == 404


async def test_api_refuses_without_the_token(api_app: App) -> None:
    assert (await get(api_app, "/api/tickets/1", token=None))[0] == 401
    assert (await get(api_app, "/api/tickets/1", token="wrong"))[0] == 401


async def status_for(app: App, authorization: bytes) -> int:
    """The status line's code for a request with this Authorization value, as raw bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.http.port)
    writer.write(b"GET /api/tickets/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: " + authorization + b"\r\n\r\n")
    status = (await reader.readline()).split()[1]
    writer.close()
    await writer.wait_closed()
    return int(status)


async def test_api_takes_the_bearer_scheme_only(api_app: App) -> None:
    token = TOKEN.encode()
    assert await status_for(api_app, b"Bearer " + token) == 404  # in: no ticket 1
    assert await status_for(api_app, b"bearer " + token) == 404  # the scheme's case is free
    assert await status_for(api_app, token) == 401  # no scheme
    assert await status_for(api_app, b"Basic " + token) == 401
    assert await status_for(api_app, b"Bearer \xe9") == 401  # not UTF-8: refused, no crash


def test_no_api_without_a_token(settings: Any) -> None:
    # No token configured: no route, and (with nothing else) no HTTP port at all.
    app = App(settings)
    assert not app.http.has_routes
    app.engine.dispose()
