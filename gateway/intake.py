"""Intake: the one writer that turns submitted messages into committed dispositions.

Channels `await intake.submit(inbound)` and acknowledge to their source only
when it returns: by then the message's ticket changes, outbox rows and
deadlines are committed. Work runs on one dedicated thread, off the event loop.
Under a burst it takes every waiting message into one transaction (group
commit): one fsync acknowledges many messages.

Each batch is tried twice at most:
- the fast path parses the batch and looks up its Message-IDs and senders in one
  query each (`Pipeline.prepare`), runs every message with autoflush off and
  flushes once, before the commit (`gateway.store.pending` keeps lookups exact
  meanwhile). It takes less than half the writer's time of the safe path;
- if anything in it fails (a message the pipeline refuses, a bug, a constraint at
  the flush), the batch is rolled back and redone on the safe path: a savepoint
  per message with autoflush on, where a message that fails rolls back only its
  own savepoint and is quarantined with its stage and reason.
If the safe path cannot commit either, every message of the batch gets
`StoreUnavailable`, so SMTP answers 451 and the sender retries.

The writer also keeps a measure of its own load (`load()`): the outbox worker
holds its deliveries back while the intake is saturated (docs/design.md,
"Inbound first").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from gateway.message import Inbound
from gateway.pipeline import Disposition, Outcome, Pipeline, StageError, quarantine
from gateway.store.pending import finish, track, untrack

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Time constant of the writer's load measure, in seconds: long enough to smooth over
# the gaps between a burst's batches, short enough that the end of a burst shows
# within about a second.
LOAD_TAU = 0.25


class StoreUnavailable(Exception):
    """The batch could not be committed; nothing of it is stored."""


@dataclass(slots=True)
class _Job:
    inbound: Inbound
    future: asyncio.Future[Disposition]
    loop: asyncio.AbstractEventLoop


_STOP = object()


class Intake:
    """Serialised, batched ingest on a worker thread."""

    def __init__(
        self,
        pipeline: Pipeline,
        sessions: sessionmaker[Session],
        *,
        batch_max: int = 64,
        batch_bytes: int = 16 * 1024 * 1024,
        clock: Clock = utcnow,
        on_commit: Callable[[list[Disposition]], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sessions = sessions
        self.batch_max = batch_max
        # The writer holds the database's write lock for a whole batch: bound it by
        # size too, so a burst of large messages cannot lock out the outbox worker.
        self.batch_bytes = batch_bytes
        self.clock = clock
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.redone = 0  # batches the fast path gave up (a bad message, a conflict)
        # Busy seconds, decayed with LOAD_TAU, as of monotonic time `_busy_at`. Written
        # by the writer thread only; a reader sees a consistent enough pair.
        self._busy = 0.0
        self._busy_at = 0.0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="intake-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish every submitted message, then stop the writer thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def submit(self, inbound: Inbound) -> Disposition:
        if self._thread is None or self._stopping:
            # After stop() began, a job queued behind the stop marker would never be
            # answered; refusing it makes SMTP say 451 and the sender retry later.
            raise StoreUnavailable("intake is not running")
        loop = asyncio.get_running_loop()
        job = _Job(inbound, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def load(self, now: float | None = None) -> float:
        """About what share of its recent time (a quarter second or so) the writer spent on
        batches, from 0 to 1.

        An exponentially decayed sum of busy time: `busy / LOAD_TAU` tends to the
        busy fraction under steady load and falls towards 0 once the writer idles.
        """
        now = time.monotonic() if now is None else now
        busy, at = self._busy, self._busy_at
        return min(1.0, busy * math.exp(-max(0.0, now - at) / LOAD_TAU) / LOAD_TAU)

    def note_busy(self, started: float, ended: float) -> None:
        """Count a batch that kept the writer busy from `started` to `ended` (monotonic)."""
        self._busy = (self._busy * math.exp(-max(0.0, ended - self._busy_at) / LOAD_TAU)
                      + (ended - started))
        self._busy_at = ended

    def ingest_now(self, inbound: Inbound) -> Disposition:
        """Synchronous ingest of one message (CLI `quarantine retry`, tests)."""
        return self._process_batch([inbound])[0]

    # -- worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs = [first]
            size = len(first.inbound.raw) if isinstance(first, _Job) else 0
            stop = False
            while len(jobs) < self.batch_max and size < self.batch_bytes:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
                if isinstance(nxt, _Job):
                    size += len(nxt.inbound.raw)
            started = time.monotonic()
            self._run_batch([j for j in jobs if isinstance(j, _Job)])
            self.note_busy(started, time.monotonic())
            if stop:
                return

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            results: list[Disposition] | BaseException = self._process_batch(
                [j.inbound for j in jobs]
            )
        except Exception as exc:
            log.error("store: batch of %d message(s) not committed: %s", len(jobs), exc)
            results = StoreUnavailable(str(exc))
        # One wake-up per event loop and batch, not per message: each wake-up is a write
        # to the loop's self-pipe and a turn of the loop.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Disposition],
                                                             int]]] = {}
        for i, job in enumerate(jobs):
            by_loop.setdefault(job.loop, []).append((job.future, i))
        for loop, futures in by_loop.items():
            loop.call_soon_threadsafe(_resolve, futures, results)

    def _process_batch(self, inbounds: list[Inbound]) -> list[Disposition]:
        now = self.clock()
        try:
            results = self._fast(inbounds, now)
        except Exception as exc:
            # Nothing of the batch is stored: go again, one savepoint per message.
            self.redone += 1
            log.info("intake: batch of %d redone message by message (%s: %s)",
                     len(inbounds), type(exc).__name__, str(exc)[:200])
            results = self._safe(inbounds, now)
        if self.on_commit is not None:
            # Committed is committed: a failing wake-up must not turn into a 451.
            try:
                self.on_commit(results)
            except Exception:
                log.exception("intake: after-commit callback failed")
        return results

    def _fast(self, inbounds: list[Inbound], now: dt.datetime) -> list[Disposition]:
        """The whole batch, autoflush off, one flush at the commit; raises on any failure."""
        with self.sessions() as session:
            track(session)
            try:
                with session.begin(), session.no_autoflush:
                    mails = self.pipeline.prepare(session, inbounds, now)
                    results = [self.pipeline.ingest(session, inbound, now, mail)
                               for inbound, mail in zip(inbounds, mails, strict=True)]
                    finish(session)
                return results
            finally:
                untrack(session)

    def _safe(self, inbounds: list[Inbound], now: dt.datetime) -> list[Disposition]:
        with self.sessions() as session, session.begin():
            return [self._one(session, inbound, now) for inbound in inbounds]

    def _one(self, session: Session, inbound: Inbound, now: dt.datetime) -> Disposition:
        try:
            with session.begin_nested():
                return self.pipeline.ingest(session, inbound, now)
        except StageError as exc:
            error = exc
        except Exception as exc:  # a bug must not lose the message
            log.exception("pipeline bug on message from %s", inbound.source)
            error = StageError("pipeline", type(exc).__name__, str(exc)[:2000])
        with session.begin_nested():
            row = quarantine(session, inbound, error, now)
        log.warning("message from %s quarantined as #%d: %s: %s", inbound.source, row.id,
                    error.stage, error.reason)
        return Disposition(Outcome.QUARANTINED, reason=f"{error.stage}: {error.reason}")


def _resolve(
    futures: list[tuple[asyncio.Future[Disposition], int]],
    results: list[Disposition] | BaseException,
) -> None:
    for future, i in futures:
        if future.done():  # the submitter gave up waiting (cancelled)
            continue
        if isinstance(results, BaseException):
            future.set_exception(results)
        else:
            future.set_result(results[i])
