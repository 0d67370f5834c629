"""Supervisor: builds the parts from settings, starts and stops channels and workers.

`App` is the wiring, shared by the daemon and the CLI. `serve()` is `helpdeskd
run`: it starts the enabled channels, the intake writer, the outbox worker and
the rules watcher, reloads rules on SIGHUP, and on SIGTERM/SIGINT stops
accepting, finishes in-flight messages and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any

from gateway.channels import Channel
from gateway.channels.imap import ImapChannel
from gateway.channels.smtp import SmtpChannel
from gateway.config import Settings
from gateway.escalation.engine import FireStats, SlaEngine
from gateway.escalation.scheduler import EscalationScheduler
from gateway.followup import Hooks
from gateway.http import HttpServer
from gateway.intake import Intake, log_disposition, utcnow
from gateway.mail.transport import Transport, make_transport
from gateway.message import Inbound
from gateway.notify import Notifier, Templates
from gateway.outbox import Delivery, EmailSender, OutboxWorker, Sender, release_held
from gateway.pipeline import Disposition, Outcome, Pipeline
from gateway.routing import RuleReloader
from gateway.store.db import make_engine, make_sessionmaker, migrate, redact_url

log = logging.getLogger(__name__)


class App:
    """Every long-lived part of helpdeskd, wired from one Settings object."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], Any] = utcnow,
        transport: Transport | None = None,
        migrate_schema: bool = True,
        run_outbox: bool = True,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = make_engine(settings.database_url)
        if migrate_schema:
            migrate(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.hooks = Hooks(settings.daemon.ticket_hook)
        override = settings.daemon.templates_dir
        self.templates = Templates(settings.path(override) if override else None)
        self.notifier = Notifier(settings, self.templates, self.hooks)
        self.rules = RuleReloader(settings.path(settings.daemon.rules_dir), settings.group_names)
        self.pipeline = Pipeline(settings, self.rules, self.notifier, self.hooks)
        # SLA deadlines (issue 6): recomputed inside every ticket change, fired by a timer.
        self.sla = SlaEngine(settings, self.sessions, self.notifier)
        self.notifier.zone_for = self.sla.zone_for
        self.pipeline.observers.append(self.sla)
        self.escalation = EscalationScheduler(
            self.sla, clock, sweep_seconds=settings.escalation.sweep_seconds,
            on_fired=self._escalation_fired,
        )
        self.intake = Intake(self.pipeline, self.sessions, clock=clock,
                             on_commit=self._after_commit,
                             spool_seconds=settings.smtp.burst_queue_seconds)
        self._transport = transport
        # False: deliveries happen only when something calls `outbox.drain()` (tests).
        self.run_outbox = run_outbox
        self.senders: dict[str, Sender] = {}
        self.outbox: OutboxWorker | None = None
        self.channels: list[Channel] = []
        # The daemon's own HTTP server; listens only if a feature registered a route.
        self.http = HttpServer(settings.http)
        self._telegram: Any = None  # the TelegramSender (owns the bots' HTTP clients)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        transport = self._transport or make_transport(self.settings.outbound,
                                                      self.settings.base_dir)
        self._transport = transport
        self.senders["email"] = EmailSender(transport)
        self.outbox = OutboxWorker(self.sessions, self.senders, self.settings.outbound,
                                   self.clock, on_failure=self._delivery_failed,
                                   intake_load=self.intake.load)
        self.intake.start()
        if self.settings.smtp.enabled:
            self.channels.append(SmtpChannel(self.settings, self.accept))
        for mailbox in self.settings.imap:
            # One task per mailbox: a failing mailbox never holds up the others.
            self.channels.append(ImapChannel(self.settings, mailbox, self.submit, self.sessions))
        if self.settings.telegram:
            self._start_telegram()
        token = self.settings.http.api_token.get_secret_value()
        if token:
            from gateway.api import Api

            Api(self, token).register()
        for channel in self.channels:
            await channel.start()
        await self.http.start()
        if self.run_outbox:
            self._tasks.append(asyncio.create_task(self.outbox.run(), name="outbox"))
        self._tasks.append(asyncio.create_task(self.rules.watch(), name="rules:watch"))
        if self.settings.escalation.enabled:
            await self.escalation.start()

    async def stop(self) -> None:
        for channel in reversed(self.channels):
            await channel.stop()
        await self.http.stop()
        await self.escalation.stop()
        await self.intake.stop()
        if self.outbox is not None:
            # Let a delivery round in progress finish (a cancelled send would sit out its
            # lease), then one last pass so what was just committed is not left waiting.
            self.outbox.stop()
            worker = [t for t in self._tasks if t.get_name() == "outbox"]
            if worker:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(worker[0]), timeout=30)
            if not worker or worker[0].done():  # never two rounds at once
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.outbox.drain(), timeout=10)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.outbox is not None:
            # Sends that ended in a round cut short: their rows must say so, or the
            # next start sends them again.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.outbox.record_unrecorded)
        if self._transport is not None:
            await self._transport.close()
        if self._telegram is not None:
            await self._telegram.close()
        self.engine.dispose()

    def _start_telegram(self) -> None:
        # Imported here: a mail-only daemon (and the CLI) need not load python-telegram-bot.
        from gateway.channels.telegram import TelegramChannel, TelegramSender, make_bot

        bots = {b.name: make_bot(self.settings, b) for b in self.settings.telegram}
        self._telegram = TelegramSender(self.sessions, bots, self.clock)
        self.senders["telegram"] = self._telegram
        # Chat rows written while no bot was configured wait as "held"; send them now.
        release_held(self.sessions, {"telegram"})
        for handle in bots.values():
            self.channels.append(TelegramChannel(self.settings, handle, self.submit, self.http))

    def _delivery_failed(self, item: Delivery, error: str, dead: bool) -> None:
        """Outbox worker thread: a row went dead. For a chat, the ticket gets an internal note."""
        if item.channel != "telegram" or not dead:
            return
        from gateway import chat

        try:
            with self.sessions() as session, session.begin():
                chat.delivery_failed(self.notifier, session, item, error, self.clock())
        except Exception:
            log.exception("outbox: row %d: could not record the failed delivery", item.id)

    async def submit(self, inbound: Inbound) -> Disposition:
        result = await self.intake.submit(inbound)
        log_disposition(inbound, result)
        return result

    async def accept(self, inbound: Inbound) -> Disposition:
        """`submit` for SMTP: under a burst the message may be spooled, and its ticket
        made after the burst (`Outcome.QUEUED`; docs/design.md, "Accept first")."""
        result = await self.intake.submit(inbound, deferrable=True)
        log_disposition(inbound, result)
        return result

    def _after_commit(self, results: list[Disposition]) -> None:
        # Called on the intake thread right after a commit: new outbox rows may wait.
        if self.outbox is not None and any(r.outcome != Outcome.DUPLICATE for r in results):
            self.outbox.wake()
        # Ticket changes may have brought an SLA alarm forward.
        self.escalation.after_commit()

    def _escalation_fired(self, stats: FireStats) -> None:
        # A firing pass wrote warnings, breaches or reminders: send what is not held.
        if self.outbox is not None and stats.mails:
            self.outbox.wake()


def freeze_startup_objects() -> None:
    """Before serving: move everything allocated so far out of the garbage collector's way.

    Modules, mappers, compiled rules and templates live as long as the process; left
    in the collected generations, every full collection walked them all again (about
    45 ms each, a pause for every message in flight). `gc.freeze()` after one
    collection leaves the collector only what the daemon allocates while it runs. Called
    before the channels listen, so the one collection it takes delays no message.
    """
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, stop_requested: Callable[[], bool] = lambda: False,
                ) -> None:
    """`helpdeskd run`: run until SIGTERM or SIGINT (or at once if `stop_requested()`
    says one came before the handlers were in place)."""
    # Handlers first: building the App (imports, migrations) takes a second, and a
    # SIGTERM or SIGHUP meanwhile must not kill the process with the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if stop_requested():
        stop.set()
    app: App | None = None
    # Reloading reads and parses files: a worker thread does it, not the event loop.
    reloads: set[asyncio.Task[object]] = set()  # held so they are not garbage-collected

    def on_sighup() -> None:
        if app is None:  # still starting: it is about to read the files anyway
            return
        app.templates.reload()
        task = loop.create_task(asyncio.to_thread(app.rules.reload))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    app = App(settings)
    freeze_startup_objects()
    await app.start()
    log.info("helpdeskd: running (%s)", redact_url(settings.database_url))
    await stop.wait()
    log.info("helpdeskd: stopping")
    await app.stop()
    log.info("helpdeskd: stopped")
