"""Durable delivery: the worker that sends outbox rows, with retries and a dead state.

Rows are written by the pipeline in the transaction that caused them. The worker
claims due rows (a lease: `next_attempt_at` moves into the future, and on
PostgreSQL `FOR UPDATE SKIP LOCKED` keeps two daemons off the same row), hands
each to its channel's sender, and records the result: `sent`; back to `pending`
with exponential backoff and jitter after a temporary failure; `dead` after a
permanent failure or `max_attempts`. Rows whose channel has no sender are `held`
until one is configured. Delivery is at-least-once: a crash between a send and
its bookkeeping resends after the lease, with the same Message-ID.

Inbound first: while the intake writer is saturated (a burst), the worker holds
its rounds back for up to `burst_hold_seconds`, so that the CPU and the
database's write lock go to answering the senders waiting for their 250. Once
the intake calms down, or the hold has run out, it delivers everything due.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer, sessionmaker

from gateway.config import OutboundSettings
from gateway.mail.transport import DeliveryError, Transport
from gateway.store.models import OutboxRow

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=5)
BATCH = 50
# The intake writer's load above which the worker holds its rounds back, and how often
# it looks again while it does.
SATURATED = 0.8
HOLD_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed outbox row, detached from the session."""

    id: int
    ticket_id: int | None
    channel: str
    kind: str
    recipients: tuple[str, ...]
    envelope_from: str
    message_id: str | None
    raw: bytes | None
    payload: dict[str, Any] | None
    attempts: int


class RetryLater(DeliveryError):
    """A temporary failure whose far side said when to come back (Telegram's 429 RetryAfter).

    The row is rescheduled for exactly then and the attempt is not counted: being
    told to slow down says nothing about whether the message can be delivered.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, permanent=False)
        self.retry_after = retry_after


class Sender(Protocol):
    """Delivers one row on its channel; raises DeliveryError on failure."""

    async def deliver(self, item: Delivery) -> None: ...


class EmailSender:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def deliver(self, item: Delivery) -> None:
        assert item.raw is not None
        await self.transport.send(item.raw, item.envelope_from, item.recipients)


def backoff(settings: OutboundSettings, attempts: int) -> dt.timedelta:
    """Exponential backoff with +-20% jitter, capped (the exponent too: 2.0 ** 1024
    overflows a float, and max_attempts has no upper bound)."""
    base = settings.backoff_seconds * 2.0 ** min(max(attempts - 1, 0), 60)
    return dt.timedelta(seconds=min(base * random.uniform(0.8, 1.2), settings.backoff_max_seconds))


class OutboxWorker:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        senders: dict[str, Sender],
        settings: OutboundSettings,
        clock: Callable[[], dt.datetime],
        *,
        on_failure: Callable[[Delivery, str, bool], None] | None = None,
        intake_load: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self.senders = senders
        self.settings = settings
        self.clock = clock
        self.on_failure = on_failure
        self.intake_load = intake_load
        self.monotonic = monotonic
        self._holding_since: float | None = None
        self._catching_up = False  # a hold ran out: deliver all that is due before another
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Results of sends not yet written to their rows. Each is noted the moment its
        # send ends, and dropped only once a commit has recorded it: a failed or
        # cancelled transaction must not lose a result, or the mail goes out again.
        self._unrecorded: list[tuple[Delivery, DeliveryError | str | None]] = []

    def wake(self) -> None:
        """Thread-safe: there may be new rows to send."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def stop(self) -> None:
        """Ask `run` to return after the delivery round in progress (never mid-send)."""
        self._stopping = True
        self._wake.set()

    def record_unrecorded(self) -> None:
        """Write the results of sends whose round was cut short (blocking: call it in
        a thread, or after the event loop's work is done)."""
        if self._unrecorded:
            outcomes = list(self._unrecorded)
            self._round(outcomes, claim=False)
            del self._unrecorded[: len(outcomes)]

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        while not self._stopping:
            self._wake.clear()
            hold = self.hold_left()
            if hold > 0:
                # Look again soon: the end of a burst brings no wake-up.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(hold, HOLD_POLL_S))
                continue
            try:
                _, delay = await self._drain(hold=True)
            except Exception:
                log.exception("outbox: worker iteration failed; retrying in 5 s")
                delay = 5.0
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def hold_left(self) -> float:
        """Seconds the worker should still hold its rounds back for a saturated intake.

        The hold starts when the worker first finds the intake saturated and lasts at
        most `burst_hold_seconds`, lulls included (a round may go out in a lull); then
        the worker delivers until nothing is due, rows committed meanwhile included,
        before it holds back again: under a burst that outlasts the hold, mail waits
        about that long, not longer and longer.
        """
        limit = self.settings.burst_hold_seconds
        if self._catching_up or not limit or self.intake_load is None:
            return 0.0
        if self.intake_load() < SATURATED:
            # A lull: deliver meanwhile. The hold is not over until a drain has caught
            # up, or the bursts around brief lulls would each start a fresh one.
            return 0.0
        now = self.monotonic()
        if self._holding_since is None:
            self._holding_since = now
            log.debug("outbox: intake saturated, holding deliveries back (at most %g s)",
                      limit)
        left = self._holding_since + limit - now
        if left <= 0:
            self._holding_since = None
            self._catching_up = True
            return 0.0
        return left

    async def drain(self) -> int:
        """Deliver every row that is due now; returns how many were attempted."""
        attempted, _ = await self._drain()
        return attempted

    async def _drain(self, *, hold: bool = False) -> tuple[int, float]:
        """Deliver every row that is due now; returns how many were attempted and the
        seconds until the next one is due. `hold`: stop after a round when the intake
        is saturated (`hold_left`); the next due time is then 0."""
        # A round's results are recorded in the transaction that claims the next
        # round, and the claim that finds nothing also says when the next row is due:
        # each write transaction here makes the intake writer wait for SQLite's lock.
        attempted = 0
        items, delay = await self._record_and_claim(claim=True)
        while items:
            attempted += len(items)
            await asyncio.gather(*(self._deliver_and_note(i) for i in items))
            if hold and self.hold_left() > 0:
                await self._record_and_claim(claim=False)
                return attempted, 0.0
            # After stop(): record this round, claim no other.
            items, delay = await self._record_and_claim(claim=not self._stopping)
        self._catching_up = False  # nothing is due: caught up
        self._holding_since = None
        return attempted, delay

    async def _record_and_claim(self, *, claim: bool) -> tuple[list[Delivery], float]:
        outcomes = list(self._unrecorded)
        items, delay = await asyncio.to_thread(self._round, outcomes, claim=claim)
        del self._unrecorded[: len(outcomes)]  # committed
        return items, delay

    async def _deliver_and_note(self, item: Delivery) -> None:
        self._unrecorded.append((item, await self._deliver(item)))

    async def _deliver(self, item: Delivery) -> DeliveryError | str | None:
        sender = self.senders.get(item.channel)
        if sender is None:
            return "held"
        try:
            await sender.deliver(item)
        except DeliveryError as exc:
            return exc
        except Exception as exc:  # a bug in a sender is a temporary failure, not a crash
            log.exception("outbox: row %d: sender failed", item.id)
            return DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False)
        return None

    # -- database (worker threads) -------------------------------------------------

    def _round(
        self, outcomes: list[tuple[Delivery, DeliveryError | str | None]], *, claim: bool
    ) -> tuple[list[Delivery], float]:
        """Record `outcomes`, claim the next due rows (if `claim`); with none, the
        seconds to the next."""
        failures: list[tuple[Delivery, str, bool]] = []
        items: list[Delivery] = []
        delay = 0.0
        with self.sessions() as session, session.begin():
            if outcomes:
                failures = self._record(session, outcomes)
            if claim:
                items = self._claim(session)
                delay = 0.0 if items else self._seconds_to_next_due(session)
        # After the commit: a failure callback writes in a transaction of its own.
        if self.on_failure is not None:
            for item, error, dead in failures:
                self.on_failure(item, error, dead)
        return items, delay

    def _claim(self, session: Session) -> list[Delivery]:
        now = self.clock()
        query = (
            select(OutboxRow)
            .where(OutboxRow.state == "pending", OutboxRow.next_attempt_at <= now)
            .order_by(OutboxRow.id)
            .limit(BATCH)
        )
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = list(session.scalars(query))
        for row in rows:
            row.next_attempt_at = now + LEASE
        return [
            Delivery(r.id, r.ticket_id, r.channel, r.kind, tuple(r.recipients),
                     r.envelope_from, r.message_id, r.raw, r.payload, r.attempts)
            for r in rows
        ]

    def _record(self, session: Session,
                outcomes: list[tuple[Delivery, DeliveryError | str | None]],
                ) -> list[tuple[Delivery, str, bool]]:
        """Write each outcome to its row; returns the failures to report after commit."""
        now = self.clock()
        failures: list[tuple[Delivery, str, bool]] = []
        # One query for the round, without the composed mail (not needed to record).
        rows = {r.id: r for r in session.scalars(
            select(OutboxRow).where(OutboxRow.id.in_([item.id for item, _ in outcomes]))
            .options(defer(OutboxRow.raw), defer(OutboxRow.payload)))}
        for item, result in outcomes:
            row = rows.get(item.id)
            if row is None or row.state != "pending":
                continue  # gone, or recorded already (a commit whose end was cancelled)
            if result is None:
                row.state, row.sent_at = "sent", now
                row.attempts += 1
                row.last_error = None
                log.info("outbox: row %d (%s, %s) sent to %s", row.id, row.kind,
                         row.message_id, row.to_address)
            elif result == "held":
                row.state = "held"
                row.last_error = f"no sender for channel {row.channel!r}"
            elif isinstance(result, RetryLater):
                row.state = "pending"
                row.last_error = str(result)[:2000]
                row.next_attempt_at = now + dt.timedelta(seconds=result.retry_after)
                log.warning("outbox: row %d to %s: asked to retry after %.0f s",
                            row.id, row.to_address, result.retry_after)
            else:
                assert isinstance(result, DeliveryError)
                row.attempts += 1
                row.last_error = str(result)[:2000]
                if result.permanent or row.attempts >= self.settings.max_attempts:
                    row.state = "dead"
                    failures.append((item, row.last_error, True))
                    log.error("outbox: row %d to %s is dead after %d attempt(s): %s",
                              row.id, row.to_address, row.attempts, row.last_error)
                else:
                    row.state = "pending"
                    row.next_attempt_at = now + backoff(self.settings, row.attempts)
                    log.warning("outbox: row %d to %s failed (attempt %d), retry at %s: %s",
                                row.id, row.to_address, row.attempts,
                                row.next_attempt_at.isoformat(), row.last_error)
        return failures

    def _seconds_to_next_due(self, session: Session) -> float:
        nxt = session.scalar(
            select(func.min(OutboxRow.next_attempt_at)).where(OutboxRow.state == "pending")
        )
        if nxt is None:
            return 300.0
        return max(0.0, min(300.0, (nxt - self.clock()).total_seconds()))


def release_held(sessions: sessionmaker[Session], channels: set[str]) -> int:
    """Put held rows of channels that now have a sender back in the queue."""
    with sessions() as session, session.begin():
        result = session.execute(
            update(OutboxRow)
            .where(OutboxRow.state == "held", OutboxRow.channel.in_(channels))
            .values(state="pending")
        )
        return int(getattr(result, "rowcount", 0) or 0)
