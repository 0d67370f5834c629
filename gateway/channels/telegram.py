"""The Telegram channel: a bot's updates in, agent replies out, inside the daemon's loop.

In: one `TelegramChannel` per configured bot. It downloads the files of a
message (photo in its largest size, document, voice, video, video note, audio; Telegram's
getFile stops at 20 MB, larger files are listed as skipped and the chat gets a
polite note) and submits the update plus its files as one `Inbound`; the chat
path (`gateway.chat`) does the rest without the network.

Polling runs our own getUpdates loop rather than PTB's `Updater`: the
Updater confirms an update to Telegram (by asking for the next offset) as soon
as it has queued it, before anyone processed it, so a crash there loses the
message. Here the offset moves past an update only after `submit` returned,
i.e. after the commit (DESIGN, "The flow of one message"); an update fetched
again after a crash is a duplicate by its update id. On stop the committed
offset is confirmed with one short getUpdates call. Updates are fetched unparsed
(see `TelegramChannel._fetch`), so one PTB cannot parse does not stop the loop.

Webhook mode registers a route on the daemon's HTTP server, checks Telegram's
`X-Telegram-Bot-Api-Secret-Token` header and answers 200 only after the commit;
any failure answers 500, and Telegram delivers the update again.

Out: `TelegramSender`, the outbox's sender for channel "telegram". A row is a
text (split at Telegram's 4096-character limit) plus files (sendPhoto for
pictures, sendDocument otherwise), sent in order at a paced rate; the parts
already sent are recorded in the row, so a retry does not repeat them. 429
(RetryAfter) reschedules the row for when Telegram says; a group upgraded to a
supergroup (ChatMigrated) has its tickets moved to the new chat id and the row
is sent there; 403 (the user blocked the bot) and other 400s are permanent, the
row goes dead and the ticket gets an internal note (`gateway.chat.delivery_failed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import mimetypes
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from telegram import Bot
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning, PTBUserWarning

from gateway.channels import Submit
from gateway.chat import SkippedFile, encode_failed, encode_raw
from gateway.config import Settings, TelegramSettings
from gateway.http import HttpServer
from gateway.intake import StoreUnavailable
from gateway.mail.transport import DeliveryError
from gateway.message import Attachment, Channel, Inbound
from gateway.outbox import Delivery, RetryLater
from gateway.pipeline import Disposition
from gateway.store.models import Blob, OutboxRow, Participant, Ticket
from gateway.store.pending import add_event

log = logging.getLogger(__name__)

T = TypeVar("T")

# Only what the chat path handles; Telegram then does not even send the rest.
ALLOWED_UPDATES = ["message", "edited_message"]
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
TEXT_LIMIT = 4096  # characters (UTF-16 code units) per sendMessage
PHOTO_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
PHOTO_LIMIT = 10 * 1024 * 1024  # sendPhoto's limit; larger pictures go as documents
MAX_BACKOFF = 60.0


def _quiet_raw_get_updates() -> None:
    """getUpdates is called through `Bot.do_api_request` on purpose, to get the updates as
    Telegram sent them (see `TelegramChannel._fetch`); PTB warns that it has a method for
    it. Installed per channel, not at import (an identical filter replaces itself): a test
    runner's warning capture drops filters installed while it collected."""
    warnings.filterwarnings("ignore", message=r"Please use 'Bot\.getUpdates'",
                            category=PTBUserWarning)


@dataclass(slots=True)
class BotHandle:
    """One configured bot: the PTB `Bot`, shared by its channel and the sender."""

    settings: TelegramSettings
    bot: Bot
    requests: tuple[HTTPXRequest, HTTPXRequest]

    async def close(self) -> None:
        await self.bot.shutdown()
        # shutdown() skips request objects the bot never initialised; ours are closed anyway.
        for request in self.requests:
            await request.shutdown()


def make_bot(settings: Settings, bot: TelegramSettings) -> BotHandle:
    """A PTB Bot for `bot`, pointed at its configured Bot API endpoints."""
    # Long polls get their own connection so they never hold up a send.
    polling = HTTPXRequest(connection_pool_size=1, read_timeout=10.0)
    calls = HTTPXRequest(connection_pool_size=8, read_timeout=30.0, media_write_timeout=60.0)
    ptb = Bot(settings.telegram_token(bot), base_url=bot.base_url,
              base_file_url=bot.base_file_url, request=calls, get_updates_request=polling)
    return BotHandle(bot, ptb, (polling, calls))


class _Stopped(Exception):
    """The channel is stopping: abandon the call in progress."""


# -- inbound ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Media:
    kind: str
    file_id: str
    filename: str
    content_type: str
    size: int | None


def media_of(message: dict[str, Any]) -> list[_Media]:
    """The files of a message worth keeping: the largest photo, document, voice, video (also
    round video notes), audio."""
    found: list[_Media] = []
    photos = message.get("photo") or []
    if photos:
        best = max(photos, key=lambda p: (p.get("file_size") or 0,
                                          p.get("width", 0) * p.get("height", 0)))
        found.append(_Media("photo", best["file_id"], f"photo_{best['file_unique_id']}.jpg",
                            "image/jpeg", best.get("file_size")))
    defaults = {"document": ("bin", "application/octet-stream"), "voice": ("ogg", "audio/ogg"),
                "video": ("mp4", "video/mp4"), "audio": ("mp3", "audio/mpeg"),
                # A round video message: an MP4 without name or MIME type.
                "video_note": ("mp4", "video/mp4")}
    for kind, (ext, ctype) in defaults.items():
        obj = message.get(kind)
        if not isinstance(obj, dict):
            continue
        # A user-chosen name is only a name: never a path.
        name = PurePosixPath(str(obj.get("file_name") or "").replace("\\", "/")).name
        mime = str(obj.get("mime_type") or "") or (
            mimetypes.guess_type(name)[0] if name else None) or ctype
        if not name:
            name = f"{kind}_{obj['file_unique_id']}.{mimetypes.guess_extension(mime) or ext}"
            name = name.replace("..", ".")
        found.append(_Media(kind, obj["file_id"], name, mime, obj.get("file_size")))
    return found


class TelegramChannel:
    """Receives one bot's updates (polling or webhook) and submits them to the intake."""

    def __init__(
        self,
        settings: Settings,
        handle: BotHandle,
        submit: Submit,
        http: HttpServer | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = handle.settings
        self.bot = handle.bot
        # The long-poll connection's read timeout; getUpdates waits `poll_timeout` on top.
        self._read_timeout = float(handle.requests[0].read_timeout or 0)
        _quiet_raw_get_updates()
        self.submit = submit
        self.name = f"telegram:{self.cfg.name}"
        # Set once the bot is known to Telegram and its webhook is set or deleted.
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._offset: int | None = None  # next update id to fetch; all below are committed
        self._confirmed: int | None = None  # the offset Telegram was last told
        if self.cfg.mode == "webhook":
            if http is None:
                raise ValueError(f"{self.name}: webhook mode needs the daemon's HTTP server")
            http.add_route("POST", self.cfg.route, self._webhook)

    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"channel:{self.name}:{self.cfg.mode}")

    async def stop(self) -> None:
        """Finish the update in flight (its commit), confirm the offset, stop."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.cfg.mode == "polling" and self._offset is not None \
                and self._offset != self._confirmed:
            # Tell Telegram what is committed, so a restart does not fetch it again.
            with contextlib.suppress(TelegramError):
                await self._fetch(self._offset, wait=0, limit=1)
                self._confirmed = self._offset
        log.info("%s: stopped", self.name)

    async def _run(self) -> None:
        try:
            if not await self._connect():
                return
            if self.cfg.mode == "polling":
                await self._poll()
        except Exception:  # one bot's trouble must not take the daemon down
            log.exception("%s: channel failed", self.name)

    async def _connect(self) -> bool:
        """getMe, then set (webhook) or delete (polling) the webhook; retried until it works."""
        delay = 1.0
        while not self._stopping.is_set():
            try:
                await self._until_stopped(self.bot.initialize())
                if self.cfg.mode == "webhook":
                    await self._until_stopped(self.bot.set_webhook(
                        url=self.cfg.webhook_url,
                        secret_token=self.cfg.webhook_secret.get_secret_value(),
                        allowed_updates=ALLOWED_UPDATES,
                    ))
                else:
                    # getUpdates is refused while a webhook is set; pending updates stay.
                    await self._until_stopped(self.bot.delete_webhook(drop_pending_updates=False))
            except _Stopped:
                return False
            except RetryAfter as exc:
                await self._pause(_retry_after(exc))
                continue
            except InvalidToken:
                log.error("%s: Telegram refused the bot token; retrying in %.0f s",
                          self.name, MAX_BACKOFF)
                await self._pause(MAX_BACKOFF)
                continue
            except TelegramError as exc:
                log.warning("%s: cannot reach the Bot API (%s); retrying in %.0f s",
                            self.name, exc, delay)
                await self._pause(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            log.info("%s: connected as @%s (%s)", self.name, self.bot.username, self.cfg.mode)
            self.ready.set()
            return True
        return False

    async def _fetch(self, offset: int | None, wait: int, limit: int | None = None
                     ) -> list[Any]:
        """getUpdates (long-polled up to `wait` seconds), unparsed: the updates as sent.

        Not `Bot.get_updates`: it parses the whole batch with PTB, and one update PTB
        cannot parse (a field it requires is missing) fails the call, every time, so the
        poller could never move past it. The chat path reads the raw update itself (as
        in webhook mode) and quarantines what it cannot understand.
        """
        result = await self.bot.do_api_request(
            "getUpdates",
            api_kwargs={"offset": offset, "limit": limit, "timeout": wait,
                        "allowed_updates": ALLOWED_UPDATES},
            read_timeout=self._read_timeout + wait,
        )
        if not isinstance(result, list):
            raise TelegramError(f"getUpdates answered {type(result).__name__}, not a list")
        return result

    async def _poll(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                updates = await self._until_stopped(self._fetch(
                    self._offset, wait=self.cfg.poll_timeout))
            except _Stopped:
                return
            except RetryAfter as exc:
                await self._pause(_retry_after(exc))
                continue
            except TelegramError as exc:
                # Network trouble, 409 (another poller or a webhook), a revoked token: back off.
                log.warning("%s: getUpdates failed (%s); retrying in %.0f s",
                            self.name, exc, delay)
                await self._pause(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            if self._offset is not None:
                self._confirmed = self._offset  # that call confirmed everything below it
            delay = 1.0
            unusable = 0
            for item in updates:
                update_id = item.get("update_id") if isinstance(item, dict) else None
                if not isinstance(update_id, int) or isinstance(update_id, bool):
                    # Nothing to confirm it by: the next update's offset confirms it too.
                    log.error("%s: getUpdates item without an update id skipped: %.300r",
                              self.name, item)
                    unusable += 1
                    continue
                try:
                    await self._process(item, update_id)
                except Exception as exc:
                    # Not committed: the offset stays, the update is fetched again. Any
                    # error (not only the expected ones) must keep the poller alive.
                    if not isinstance(exc, StoreUnavailable | TelegramError):
                        log.exception("%s: update %d failed unexpectedly", self.name,
                                      update_id)
                    log.error("%s: update %d not stored (%s); retrying in %.0f s",
                              self.name, update_id, exc, delay)
                    await self._pause(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                    break
                self._offset = update_id + 1
                if self._stopping.is_set():
                    return
            if updates and unusable == len(updates):
                # Only such items: they come back at once; do not spin on them.
                await self._pause(MAX_BACKOFF)

    async def _webhook(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get(SECRET_HEADER, "").encode()
        expected = self.cfg.webhook_secret.get_secret_value().encode()
        if not hmac.compare_digest(given, expected):
            log.warning("%s: webhook call from %s without the secret token, refused",
                        self.name, request.remote)
            return web.Response(status=403, text="forbidden")
        if self._stopping.is_set():
            return web.Response(status=503, text="stopping")  # Telegram delivers it later
        try:
            data = await request.json()
            update_id = data["update_id"]
            if not isinstance(update_id, int):
                raise TypeError("update_id is not an integer")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: malformed webhook body refused: %s", self.name, exc)
            return web.Response(status=400, text="not an update")
        try:
            result = await self._process(data, update_id)
        except (StoreUnavailable, TelegramError) as exc:
            log.error("%s: update %d not stored, answered 500: %s", self.name, update_id, exc)
            return web.Response(status=500, text="not stored, try again")
        return web.json_response({"ok": True, "outcome": result.outcome.value})

    async def _process(self, data: dict[str, Any], update_id: int) -> Disposition:
        """Download the message's files, submit; returns after the commit."""
        try:
            raw = await self._prepare(data, update_id)
        except TelegramError:
            raise  # the network or Telegram: worth trying again (fetched/delivered again)
        except Exception as exc:
            # Anything else fails the same way on every retry and would hold up every
            # later update of the bot: submit the update as it came, to be quarantined.
            log.exception("%s: update %d could not be prepared; quarantining it",
                          self.name, update_id)
            raw = encode_failed(self.cfg.name, data, f"{type(exc).__name__}: {exc}")
        inbound = Inbound(
            channel=Channel.TELEGRAM,
            raw=raw,
            received_at=dt.datetime.now(dt.UTC),
            source=self.name,
            channel_message_id=f"{self.cfg.name}:{update_id}",
        )
        return await self.submit(inbound)

    async def _prepare(self, data: dict[str, Any], update_id: int) -> bytes:
        """The update plus its downloaded files, as `Inbound.raw`."""
        files: list[tuple[str, Attachment]] = []
        skipped: list[SkippedFile] = []
        message = data.get("message")
        if isinstance(message, dict) and self._accepts(message):
            for media in media_of(message):
                got = await self._download(media, update_id)
                if isinstance(got, Attachment):
                    files.append((media.kind, got))
                else:
                    skipped.append(got)
        # The username is known once getMe answered (`ready`); a webhook call can come first.
        username = self.bot.username if self.ready.is_set() else ""
        # base64 and JSON of up to 20 MB per file take ~0.2 s: not on the event loop.
        return await asyncio.to_thread(encode_raw, self.cfg.name, data, files, skipped,
                                       username)

    def _accepts(self, message: dict[str, Any]) -> bool:
        # Files of a group message that will be refused are not worth fetching.
        chat_type = (message.get("chat") or {}).get("type")
        return chat_type == "private" or self.cfg.allow_groups

    async def _download(self, media: _Media, update_id: int) -> Attachment | SkippedFile:
        limit = self.cfg.max_download_bytes
        if media.size is not None and media.size > limit:
            log.info("%s: update %d: %s of %d bytes is over the limit, not fetched",
                     self.name, update_id, media.filename, media.size)
            return SkippedFile(media.kind, media.filename, media.size)
        try:
            file = await self.bot.get_file(media.file_id)
            data = bytes(await file.download_as_bytearray())
        except BadRequest as exc:
            # "file is too big" and the like: retrying cannot help, keep the message.
            log.warning("%s: update %d: %s not fetched: %s", self.name, update_id,
                        media.filename, exc)
            return SkippedFile(media.kind, media.filename, media.size or 0)
        if len(data) > limit:
            return SkippedFile(media.kind, media.filename, len(data))
        return Attachment(media.filename, media.content_type, data)

    async def _until_stopped(self, call: Awaitable[T]) -> T:
        """Await `call` unless the channel stops first (then cancel it and raise _Stopped)."""
        task = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Stopped

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


# -- outbound --------------------------------------------------------------------------


class Pacer:
    """Spaces one bot's sends: at most one per `chat_interval` in a chat, one per `bot_interval`.

    Slots are reserved without awaiting, so concurrent deliveries queue fairly.
    """

    def __init__(self, chat_interval: float, bot_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.chat_interval = chat_interval
        self.bot_interval = bot_interval
        self.clock = clock
        self._next_bot = 0.0
        self._next_chat: dict[int, float] = {}

    def reserve(self, chat_id: int) -> float:
        """Reserve the next slot for `chat_id`; returns how many seconds to wait for it."""
        now = self.clock()
        slot = max(now, self._next_bot, self._next_chat.get(chat_id, 0.0))
        self._next_bot = slot + self.bot_interval
        self._next_chat[chat_id] = slot + self.chat_interval
        if len(self._next_chat) > 10_000:
            self._next_chat = {c: t for c, t in self._next_chat.items() if t > now}
        return slot - now

    async def wait(self, chat_id: int) -> None:
        delay = self.reserve(chat_id)
        if delay > 0:
            await asyncio.sleep(delay)


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split `text` into messages of at most `limit` UTF-16 code units (Telegram's measure).

    Cuts prefer a paragraph break, then a line break, then a space, in the second
    half of the allowed length; a code point is never cut.
    """
    parts: list[str] = []
    rest = text.strip()
    while _u16(rest) > limit:
        cut, used = 0, 0
        for ch in rest:
            used += 2 if ord(ch) > 0xFFFF else 1
            if used > limit:
                break
            cut += 1
        window = rest[:cut]
        for sep in ("\n\n", "\n", " "):
            at = window.rfind(sep)
            if at > cut // 2:
                cut = at + len(sep)
                break
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts or [""]


def _u16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class TelegramSender:
    """The outbox's sender for channel "telegram" (rows written by `Notifier.enqueue_chat`)."""

    def __init__(self, sessions: sessionmaker[Session], bots: dict[str, BotHandle],
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.sessions = sessions
        self.bots = bots
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.pacers = {
            name: Pacer(h.settings.chat_interval_seconds, h.settings.bot_interval_seconds)
            for name, h in bots.items()
        }

    async def close(self) -> None:
        for handle in self.bots.values():
            with contextlib.suppress(Exception):
                await handle.close()

    async def deliver(self, item: Delivery) -> None:
        payload = dict(item.payload or {})
        handle = self.bots.get(str(payload.get("bot")))
        if handle is None:
            raise DeliveryError(f"telegram bot {payload.get('bot')!r} is not configured",
                                permanent=True)
        chat_id = int(payload["chat_id"])
        steps: list[tuple[str, Any]] = [("text", t) for t in split_text(str(payload["text"]))
                                        if t]
        steps += [("file", f) for f in payload.get("attachments", [])]
        done = int(payload.get("done", 0))
        sent = done
        migrated = False
        try:
            for kind, value in steps[done:]:
                while True:
                    await self.pacers[handle.settings.name].wait(chat_id)
                    try:
                        if kind == "text":
                            await handle.bot.send_message(chat_id, value)
                        else:
                            await self._send_file(handle.bot, chat_id, value)
                    except ChatMigrated as exc:
                        if migrated:
                            raise  # moved twice in one delivery: retried later, as any error
                        # The group became a supergroup, with a new chat id; the old one
                        # is dead for good. Move the chat's tickets there and send again.
                        new_id = int(exc.new_chat_id)
                        await asyncio.to_thread(self._migrate, handle.settings.name,
                                                chat_id, new_id)
                        chat_id = payload["chat_id"] = new_id
                        migrated = True
                        continue
                    break
                sent += 1
        except RetryAfter as exc:
            raise RetryLater(f"Telegram flood control: {exc}",
                             retry_after=_retry_after(exc)) from exc
        except Forbidden as exc:
            raise DeliveryError(f"Forbidden: {exc.message}", permanent=True) from exc
        except BadRequest as exc:
            # Chat not found, bad file, ...: the same request will fail the same way.
            raise DeliveryError(f"Bad request: {exc.message}", permanent=True) from exc
        except TelegramError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc.message}", permanent=False) from exc
        finally:
            if sent != done or migrated:
                # Parts already in the chat are not sent again by a retry, nor to the old chat.
                payload["done"] = sent
                await asyncio.to_thread(self._save_progress, item.id, payload)
        log.info("telegram %s: outbox %d (%s) delivered to chat %d in %d part(s)",
                 handle.settings.name, item.id, item.kind, chat_id, len(steps))

    async def _send_file(self, bot: Bot, chat_id: int, ref: dict[str, Any]) -> None:
        data = await asyncio.to_thread(self._blob, str(ref["sha256"]))
        if data is None:
            log.warning("telegram: attachment %s (%s) has no stored content, skipped",
                        ref.get("filename"), ref.get("sha256"))
            return
        filename = str(ref.get("filename") or "file")
        if ref.get("content_type") in PHOTO_TYPES and len(data) <= PHOTO_LIMIT:
            await bot.send_photo(chat_id, photo=data, filename=filename)
        else:
            await bot.send_document(chat_id, document=data, filename=filename)

    def _blob(self, sha256: str) -> bytes | None:
        with self.sessions() as session:
            blob = session.get(Blob, sha256)
            return blob.data if blob is not None else None

    def _migrate(self, bot: str, old: int, new: int) -> None:
        """Point the tickets of chat `old` on `bot` at chat `new` (a group now a supergroup).

        The chat is the customer (`telegram:<chat id>`), so the customer moves too:
        the supergroup's next messages then follow up the same tickets.
        """
        old_key, new_key = f"telegram:{old}", f"telegram:{new}"
        now = self.clock()
        with self.sessions() as session, session.begin():
            tickets = [t for t in session.scalars(
                select(Ticket).where(Ticket.channel == "telegram", Ticket.customer == old_key))
                if (t.channel_ref or {}).get("bot") == bot]
            for ticket in tickets:
                # A new dict: the JSON column does not track changes inside the old one.
                ticket.channel_ref = {**(ticket.channel_ref or {}), "chat_id": new}
                ticket.customer = new_key
                session.execute(update(Participant).where(
                    Participant.ticket_id == ticket.id, Participant.address == old_key)
                    .values(address=new_key))
                add_event(session, ticket, at=now, actor="system", kind="chat-migrated",
                          data={"bot": bot, "from": old, "to": new})
        log.info("telegram %s: chat %d became supergroup %d; %d ticket(s) moved",
                 bot, old, new, len(tickets))

    def _save_progress(self, row_id: int, payload: dict[str, Any]) -> None:
        with self.sessions() as session, session.begin():
            session.execute(update(OutboxRow).where(OutboxRow.id == row_id)
                            .values(payload=payload))


def _retry_after(exc: RetryAfter) -> float:
    """Seconds Telegram asked us to wait.

    PTB 22 returns an int and warns that a later major version returns a timedelta
    (opt-in by environment); both are accepted here, and the warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value: int | float | dt.timedelta = exc.retry_after
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return float(value)
