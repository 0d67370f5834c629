"""The read-only HTTP API: tickets (with their SLA deadlines) and incident reviews as JSON.

Served by the daemon's own HTTP server when `[http] api_token` is set, and only
to callers that present it (`Authorization: Bearer <token>`): ticket data is
personal data. The JSON is the same as `helpdeskd tickets show --json`,
`sla explain --json` and `incidents review --json`. Database work runs in a
worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.daemon import App

log = logging.getLogger(__name__)


class Api:
    def __init__(self, app: App, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def register(self) -> None:
        http = self.app.http
        http.add_route("GET", "/api/tickets/{number}", self.ticket)
        http.add_route("GET", "/api/tickets/{number}/sla", self.sla)
        http.add_route("GET", "/api/incidents/{number}/reviews", self.reviews)

    def _authorised(self, request: web.Request) -> bool:
        # RFC 6750 2.1: "Bearer" and the token; the scheme's case does not matter (RFC
        # 9110 11.1). aiohttp hands over non-UTF-8 bytes as surrogate escapes: they
        # must compare as unequal, not raise.
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), self.token)

    async def _answer(self, request: web.Request, data: Any) -> web.StreamResponse:
        if data is None:
            return web.json_response({"error": "no such ticket"}, status=404)
        return web.json_response(data)

    async def ticket(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        from gateway.cli import ticket_detail

        number = request.match_info["number"]
        return await self._answer(request, await asyncio.to_thread(
            ticket_detail, self.app, number))

    async def sla(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        from gateway.escalation.report import sla_explain

        number = request.match_info["number"]
        return await self._answer(request, await asyncio.to_thread(
            sla_explain, self.app.sla, self.app.sessions, number, self.app.clock()))

    async def reviews(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        from gateway.escalation.report import incident_reviews

        number = request.match_info["number"]
        return await self._answer(request, await asyncio.to_thread(
            incident_reviews, self.app.sessions, number))
