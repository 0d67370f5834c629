"""A loopback stand-in for the Telegram Bot API: an aiohttp server in the test's own loop.

The daemon's python-telegram-bot is pointed at it with `base_url`/`base_file_url`
(`api.base_url`, `api.base_file_url`). It speaks the methods the daemon uses:
getMe; getUpdates with Telegram's offset semantics (an offset confirms every
update below it; an empty queue is long-polled up to `timeout`; 409 while a
webhook is set); setWebhook/deleteWebhook, and with a webhook set it POSTs each
update there with the secret-token header, keeping it queued until answered
2xx, as Telegram does; getFile and the file download; sendMessage, sendDocument,
sendPhoto. It answers 429 with retry_after, 403, or 400 with migrate_to_chat_id when
told to (`fail_next`, `block`, `migrate`), and records every call::

    async with BotApi() as api:
        bot = api.add_bot("123:abc", "helpbot")
        bot.message(5551, "Cannot log in")
        await api.wait_until(lambda: bot.sent)

`guard_real_telegram` makes any attempt to reach api.telegram.org fail (and records it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, ClientTimeout, web

__all__ = ["BotApi", "Call", "FakeBot", "Sent", "guard_real_telegram"]

REAL_HOSTS = ("api.telegram.org",)


@dataclass(frozen=True)
class Call:
    """One Bot API request the stand-in received."""

    bot: str
    method: str
    params: dict[str, Any]
    status: int


@dataclass(frozen=True)
class Sent:
    """One message a bot sent successfully (sendMessage, sendDocument or sendPhoto)."""

    chat_id: int
    method: str
    text: str | None = None
    filename: str | None = None
    content_type: str | None = None
    data: bytes | None = None


@dataclass
class FakeBot:
    """One bot's state at the stand-in: its update queue, files, webhook, sent messages."""

    api: BotApi
    token: str
    username: str
    id: int
    pending: list[dict[str, Any]] = field(default_factory=list)
    # Every update ever pushed, by id (for `requeue`).
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    confirmed_offset: int | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    # (update_id, HTTP status) of every webhook delivery attempt.
    webhook_deliveries: list[tuple[int, int]] = field(default_factory=list)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    blocked: set[int] = field(default_factory=set)
    # Groups upgraded to supergroups: old chat id -> new chat id.
    migrated: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[str, int, int | None]] = field(default_factory=list)
    _update_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(700001))
    _message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _file_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # -- what the test makes happen -----------------------------------------------------

    def add_file(self, data: bytes, path_hint: str = "documents/file") -> dict[str, Any]:
        """Store a file users "uploaded"; returns its file_id, file_unique_id and size."""
        n = next(self._file_ids)
        file_id = f"F{self.id}_{n}"
        self.files[file_id] = (f"{path_hint}_{n}", data)
        return {"file_id": file_id, "file_unique_id": f"U{self.id}_{n}", "file_size": len(data)}

    def message(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        first_name: str = "Dana",
        last_name: str = "User",
        username: str = "dana",
        user_id: int | None = None,
        chat_type: str = "private",
        chat_title: str | None = None,
        caption: str | None = None,
        photo: bytes | None = None,
        document: tuple[str, str, bytes] | None = None,
        voice: bytes | None = None,
        declared_size: int | None = None,
    ) -> dict[str, Any]:
        """Push a new message update, as if user `chat_id` wrote to the bot; returns it."""
        uid = user_id if user_id is not None else chat_id
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat.update(first_name=first_name, last_name=last_name, username=username)
        else:
            chat["title"] = chat_title or "Some group"
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": uid, "is_bot": False, "first_name": first_name,
                     "last_name": last_name, "username": username},
        }
        if text is not None:
            msg["text"] = text
            if text.startswith("/"):
                cmd = text.split()[0]
                msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(cmd)}]
        if caption is not None:
            msg["caption"] = caption
        if photo is not None:
            big = self.add_file(photo, "photos/file")
            small = self.add_file(photo[: max(1, len(photo) // 10)], "photos/thumb")
            msg["photo"] = [
                {**small, "width": 90, "height": 60},
                {**big, "width": 1280, "height": 853},
            ]
        if document is not None:
            name, mime, data = document
            ref = self.add_file(data, "documents/file")
            if declared_size is not None:
                ref["file_size"] = declared_size
            msg["document"] = {**ref, "file_name": name, "mime_type": mime}
        if voice is not None:
            msg["voice"] = {**self.add_file(voice, "voice/file"), "duration": 3,
                            "mime_type": "audio/ogg"}
        return self.push({"message": msg})

    def edit(self, update: dict[str, Any], text: str) -> dict[str, Any]:
        """Push an edited_message update for the message in `update`."""
        msg = dict(update["message"])
        msg["text"] = text
        msg["edit_date"] = int(time.time())
        return self.push({"edited_message": msg})

    def push(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        self.history[update["update_id"]] = update
        self.pending.append(update)
        self.api._changed()
        if self.webhook_url:
            self.api._spawn_webhook(self)
        return update

    def requeue(self, *update_ids: int) -> None:
        """Deliver updates again (Telegram does after a crash before the offset moved on)."""
        for uid in update_ids:
            self.pending.append(self.history[uid])
        self.pending.sort(key=lambda u: u["update_id"])
        self.confirmed_offset = None
        self.api._changed()
        if self.webhook_url:
            self.api._spawn_webhook(self)

    def fail_next(self, method: str, status: int, *, retry_after: int | None = None,
                  count: int = 1, after: int = 0) -> None:
        """Answer `count` calls of `method` with `status` (429 carries retry_after),
        after letting `after` calls of it succeed."""
        self.failures.extend([(method, 0, None)] * after)
        self.failures.extend([(method, status, retry_after)] * count)

    def block(self, chat_id: int) -> None:
        """The user blocked the bot: every send to the chat gets 403."""
        self.blocked.add(chat_id)

    def migrate(self, chat_id: int, new_chat_id: int) -> None:
        """The group became a supergroup: sends to `chat_id` get 400 with migrate_to_chat_id."""
        self.migrated[chat_id] = new_chat_id

    def calls(self, method: str | None = None) -> list[Call]:
        return [c for c in self.api.calls if c.bot == self.username
                and (method is None or c.method == method)]

    def texts(self, chat_id: int) -> list[str]:
        return [s.text or "" for s in self.sent if s.chat_id == chat_id and s.text is not None]


class BotApi:
    """The stand-in server; an async context manager."""

    def __init__(self) -> None:
        self.bots: dict[str, FakeBot] = {}
        self.calls: list[Call] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._cond: asyncio.Condition | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._webhook_locks: dict[str, asyncio.Lock] = {}
        self._client: ClientSession | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/file/bot"

    def add_bot(self, token: str, username: str) -> FakeBot:
        bot = FakeBot(self, token, username, int(token.split(":", 1)[0]))
        self.bots[token] = bot
        return bot

    async def __aenter__(self) -> BotApi:
        self._cond = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        self._client = ClientSession(timeout=ClientTimeout(total=10))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._closing = True
        if self._cond is not None:
            async with self._cond:  # ends long polls now, not at their timeout
                self._cond.notify_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- waiting ---------------------------------------------------------------------------

    async def wait_until(
        self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"  # noqa: ASYNC109
    ) -> None:
        """Wait until `predicate()` is true; re-checked whenever the stand-in sees traffic."""
        assert self._cond is not None
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    # Woken by traffic; the short cap also catches state that changes
                    # elsewhere (the daemon's database).
                    async with self._cond:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._cond.wait(), 0.05)
        except TimeoutError:
            raise TimeoutError(f"Bot API stand-in: {what} not reached in {timeout}s") from None

    def _changed(self) -> None:
        if self._cond is None:
            return

        async def notify() -> None:
            assert self._cond is not None
            async with self._cond:
                self._cond.notify_all()

        self._track(asyncio.get_running_loop().create_task(notify()))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the API ---------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        bot = self.bots.get(request.match_info["token"])
        method = request.match_info["method"]
        if bot is None:
            return _error(401, "Unauthorized")
        params, files = await _read_params(request)
        response = await self._answer(bot, method, params, files)
        self.calls.append(Call(bot.username, method, params, response.status))
        self._changed()
        return response

    async def _answer(self, bot: FakeBot, method: str, params: dict[str, Any],
                      files: dict[str, tuple[str, str, bytes]]) -> web.Response:
        for i, (name, status, retry_after) in enumerate(bot.failures):
            if name == method:
                del bot.failures[i]
                if status == 0:
                    break  # a call let through by `fail_next(after=...)`
                if status == 429:
                    return _error(429, f"Too Many Requests: retry after {retry_after}",
                                  {"retry_after": retry_after or 1})
                return _error(status, "Forbidden: bot was blocked by the user"
                              if status == 403 else "Error")
        if method == "getMe":
            return _ok({"id": bot.id, "is_bot": True, "first_name": bot.username,
                        "username": bot.username, "can_join_groups": True,
                        "can_read_all_group_messages": False, "supports_inline_queries": False})
        if method == "getUpdates":
            return await self._get_updates(bot, params)
        if method == "setWebhook":
            bot.webhook_url = str(params["url"])
            bot.webhook_secret = params.get("secret_token")
            self._spawn_webhook(bot)
            return _ok(True)
        if method == "deleteWebhook":
            bot.webhook_url = bot.webhook_secret = None
            if params.get("drop_pending_updates") in (True, "true"):
                bot.pending.clear()
            return _ok(True)
        if method == "getFile":
            file_id = str(params["file_id"])
            if file_id not in bot.files:
                return _error(400, "Bad Request: invalid file_id")
            path, data = bot.files[file_id]
            if len(data) > 20 * 1024 * 1024:
                return _error(400, "Bad Request: file is too big")
            return _ok({"file_id": file_id, "file_unique_id": f"u{file_id}",
                        "file_size": len(data), "file_path": path})
        if method in ("sendMessage", "sendDocument", "sendPhoto"):
            return self._send(bot, method, params, files)
        return _error(404, "Not Found: method not found")

    async def _get_updates(self, bot: FakeBot, params: dict[str, Any]) -> web.Response:
        if bot.webhook_url:
            return _error(409, "Conflict: can't use getUpdates method while webhook is active;"
                               " use deleteWebhook to delete the webhook first")
        offset = params.get("offset")
        if offset is not None:
            # Telegram: an offset confirms every update with a smaller id, for good.
            bot.confirmed_offset = int(offset)
            bot.pending = [u for u in bot.pending if u["update_id"] >= int(offset)]
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if not bot.pending and timeout > 0 and not self._closing:
            assert self._cond is not None
            try:
                async with asyncio.timeout(timeout), self._cond:
                    await self._cond.wait_for(lambda: bool(bot.pending) or self._closing
                                              or bool(bot.webhook_url))
            except TimeoutError:
                pass
        return _ok(bot.pending[:limit])

    def _send(self, bot: FakeBot, method: str, params: dict[str, Any],
              files: dict[str, tuple[str, str, bytes]]) -> web.Response:
        chat_id = int(params["chat_id"])
        if chat_id in bot.blocked:
            return _error(403, "Forbidden: bot was blocked by the user")
        if chat_id in bot.migrated:
            return _error(400, "Bad Request: group chat was upgraded to a supergroup chat",
                          {"migrate_to_chat_id": bot.migrated[chat_id]})
        message: dict[str, Any] = {
            "message_id": next(bot._message_ids), "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private"},
            "from": {"id": bot.id, "is_bot": True, "first_name": bot.username},
        }
        if method == "sendMessage":
            text = str(params["text"])
            if len(text.encode("utf-16-le")) // 2 > 4096:
                return _error(400, "Bad Request: message is too long")
            bot.sent.append(Sent(chat_id, method, text=text))
            message["text"] = text
            return _ok(message)
        field_name = "document" if method == "sendDocument" else "photo"
        value = params.get(field_name)
        part = files.get(field_name)
        if part is None and isinstance(value, str) and value.startswith("attach://"):
            part = files.get(value[len("attach://"):])
        if part is None:
            return _error(400, f"Bad Request: no {field_name} uploaded")
        filename, ctype, data = part
        bot.sent.append(Sent(chat_id, method, filename=filename, content_type=ctype, data=data))
        ref = {"file_id": f"S{len(bot.sent)}", "file_unique_id": f"s{len(bot.sent)}",
               "file_size": len(data)}
        if method == "sendDocument":
            message["document"] = {**ref, "file_name": filename}
        else:
            message["photo"] = [{**ref, "width": 100, "height": 100}]
        return _ok(message)

    async def _file(self, request: web.Request) -> web.Response:
        bot = self.bots.get(request.match_info["token"])
        path = request.match_info["path"]
        self.calls.append(Call(bot.username if bot else "?", "download", {"path": path}, 200))
        self._changed()
        if bot is None:
            return web.Response(status=401)
        for stored_path, data in bot.files.values():
            if stored_path == path:
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)

    # -- webhook delivery (what Telegram does when a webhook is set) -------------------------

    def _spawn_webhook(self, bot: FakeBot) -> None:
        self._track(asyncio.get_running_loop().create_task(self._deliver_webhook(bot)))

    async def _deliver_webhook(self, bot: FakeBot) -> None:
        lock = self._webhook_locks.setdefault(bot.token, asyncio.Lock())
        async with lock:  # one delivery at a time per bot keeps updates in order
            while bot.pending and bot.webhook_url and not self._closing:
                update = bot.pending[0]
                headers = {"X-Telegram-Bot-Api-Secret-Token": bot.webhook_secret or ""}
                assert self._client is not None
                try:
                    async with self._client.post(bot.webhook_url, json=update,
                                                 headers=headers) as resp:
                        status = resp.status
                except OSError:
                    status = 0
                bot.webhook_deliveries.append((update["update_id"], status))
                self._changed()
                if 200 <= status < 300:
                    if bot.pending and bot.pending[0] is update:
                        bot.pending.pop(0)
                else:
                    return  # kept queued; delivered again on the next push or `redeliver`

    def redeliver(self, bot: FakeBot) -> None:
        """Try the webhook again now (Telegram retries failed deliveries by itself)."""
        self._spawn_webhook(bot)

    async def post_webhook(self, url: str, body: Any, secret: str | None) -> int:
        """POST an arbitrary body to a webhook (as an attacker or a broken proxy might)."""
        assert self._client is not None
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
        async with self._client.post(url, json=body, headers=headers) as resp:
            return resp.status


async def _read_params(request: web.Request) -> tuple[dict[str, Any],
                                                      dict[str, tuple[str, str, bytes]]]:
    """Form or multipart parameters (PTB JSON-encodes non-string values), plus uploads."""
    params: dict[str, Any] = {}
    files: dict[str, tuple[str, str, bytes]] = {}
    if request.content_type == "application/json":
        params = dict(await request.json())
        return params, files
    form = await request.post()
    for key, value in form.items():
        if isinstance(value, web.FileField):
            files[key] = (value.filename, value.content_type, value.file.read())
            continue
        text = str(value)
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
        if isinstance(params[key], (int, float)) and not text.lstrip("-").isdigit():
            params[key] = text  # keep things like "1e5" literal
    return params, files


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(status: int, description: str, parameters: dict[str, Any] | None = None
           ) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)


# -- the guard ---------------------------------------------------------------------------------


def guard_real_telegram(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every attempt to reach the real Bot API fail; returns the list of attempts."""
    attempts: list[str] = []
    real_handle = httpx.AsyncHTTPTransport.handle_async_request
    real_getaddrinfo = socket.getaddrinfo

    async def handle(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.url.host in REAL_HOSTS:
            attempts.append(str(request.url.copy_with(path="/<redacted>")))
            raise httpx.ConnectError("tests must not reach the real Telegram", request=request)
        return await real_handle(self, request)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, (str, bytes)) and (
                host.decode() if isinstance(host, bytes) else host) in REAL_HOSTS:
            attempts.append(f"getaddrinfo {host!r}")
            raise OSError("tests must not reach the real Telegram")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", handle)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts
