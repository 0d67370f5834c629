"""The daemon's own HTTP server: one aiohttp site on [http] host:port, owned by `App`.

Features register their routes (Telegram webhooks, the JSON API in gateway/api.py)
before `App` starts it; with no route registered it does not listen at all, so
a mail-only daemon opens no HTTP port. Handlers answer only after their work is
committed, like every other channel.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import HttpSettings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
    """Collects routes, then serves them from one aiohttp application."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._routes: list[tuple[str, str, Handler]] = []
        self._runner: web.AppRunner | None = None
        self._port = 0

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Register a route; only before `start` (aiohttp freezes the router then)."""
        if self._runner is not None:
            raise RuntimeError(f"http: route {method} {path} added after the server started")
        self._routes.append((method, path, handler))

    @property
    def has_routes(self) -> bool:
        return bool(self._routes)

    @property
    def port(self) -> int:
        """The port actually bound (useful when [http] port is 0)."""
        if self._runner is None:
            raise RuntimeError("http: server is not running")
        return self._port

    async def start(self) -> None:
        if not self._routes or self._runner is not None:
            return
        app = web.Application(client_max_size=1024 * 1024)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        self._runner = runner
        addresses = runner.addresses
        self._port = int(addresses[0][1]) if addresses else self.settings.port
        log.info("http: listening on %s:%d (%d route(s))", self.settings.host, self._port,
                 len(self._routes))

    async def stop(self) -> None:
        if self._runner is None:
            return
        # cleanup() lets requests in flight finish (their commit and answer) first.
        await self._runner.cleanup()
        self._runner = None
        log.info("http: stopped")
