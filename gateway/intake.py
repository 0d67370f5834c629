"""Intake: the one writer that turns submitted messages into committed dispositions.

Channels `await intake.submit(inbound)` and acknowledge to their source only
when it returns: by then the message's ticket changes, outbox rows and
deadlines are committed (or, spooled under a burst, the message itself; below).
Work runs on one dedicated thread, off the event loop. Under a burst it takes
every waiting message into one transaction (group commit): one fsync
acknowledges many messages.

Each batch is tried twice at most:
- the fast path parses the batch and looks up its Message-IDs and senders in one
  query each (`Pipeline.prepare`), runs every message with autoflush off and
  flushes once, before the commit (`gateway.store.pending` keeps lookups exact
  meanwhile). It takes less than half the writer's time of the safe path;
- if anything in it fails (a message the pipeline refuses, a bug, a constraint at
  the flush), the batch is rolled back and redone on the safe path: a savepoint
  per message with autoflush on, where a message that fails rolls back only its
  own savepoint and is quarantined with its stage and reason (unless the store
  itself failed, STORE_DOWN: that fails the batch).
If the safe path cannot commit either, every message of the batch gets
`StoreUnavailable`, so SMTP answers 451 and the sender retries.

The writer also keeps a measure of its own load (`load()`): the outbox worker
holds its deliveries back while the intake is saturated (docs/design.md,
"Inbound first").

Accept first under a burst (docs/design.md): a channel that may acknowledge a
message before its ticket exists (SMTP) submits it as `deferrable`. When a queue
has formed (QUEUE_FORMED or more waiting for one batch), such messages are
committed to the spool as raw bytes, one insert per batch, and answered
`Outcome.QUEUED` at once; the writer runs the pipeline on the spool, oldest
first, when the arrivals would no longer saturate it, or when the oldest has
waited `spool_seconds`, and then, while it is overdue, as many spooled messages
as arrived with each batch of arrivals. While anything is spooled, new
deferrable messages join the spool behind it, so mail is still processed in the
order it came.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gateway.message import Inbound
from gateway.outbox import SATURATED
from gateway.pipeline import Disposition, Outcome, Pipeline, StageError, quarantine
from gateway.store import spool
from gateway.store.pending import finish, track, untrack

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Time constant of the writer's load measure, in seconds: long enough to smooth over
# the gaps between a burst's batches, short enough that the end of a burst shows
# within about a second.
LOAD_TAU = 0.25
# After a spooled batch could not be processed (the store failed), wait this long.
SPOOL_RETRY_S = 1.0
# A spooled message that alone failed this many drains in a row is quarantined as it
# is, so one message the store cannot take does not hold up every message behind it.
POISON_TRIES = 3
# Spooled messages per pipeline batch: small enough that a message arriving meanwhile
# waits a few tens of milliseconds at most, large enough to share the commit.
SPOOL_BATCH = 8
# Batches at least this large teach the writer what a spooled message will cost.
COST_BATCH = 8
# The store failing -- a lost connection, a lock or statement timeout, a full disk --
# is no fault of the message in hand: its batch fails (SMTP 451; a drain tries again
# later), and it is neither quarantined nor counted towards POISON_TRIES.
STORE_DOWN = (OperationalError, InterfaceError)
# Deferrable messages waiting for one batch that make it a burst: at 100 messages a
# second a batch of a few milliseconds almost never finds two waiting, a burst over
# eight connections finds four or more from its first batches.
QUEUE_FORMED = 4


class StoreUnavailable(Exception):
    """The batch could not be committed; nothing of it is stored."""


@dataclass(slots=True)
class _Job:
    inbound: Inbound
    future: asyncio.Future[Disposition]
    loop: asyncio.AbstractEventLoop
    deferrable: bool = False


class _Decayed:
    """A sum of seconds that decays with LOAD_TAU; divided by LOAD_TAU it tends to the
    share of time they fill. Written by the writer thread only; a reader sees a
    consistent enough pair."""

    __slots__ = ("_at", "_sum")

    def __init__(self) -> None:
        self._sum = 0.0
        self._at = 0.0

    def at(self, now: float) -> float:
        return self._sum * math.exp(-max(0.0, now - self._at) / LOAD_TAU)

    def add(self, now: float, seconds: float) -> None:
        self._sum = self.at(now) + seconds
        self._at = now


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
        spool_seconds: float = 0.0,
    ) -> None:
        self.pipeline = pipeline
        self.sessions = sessions
        self.batch_max = batch_max
        # The writer holds the database's write lock for a whole batch: bound it by
        # size too, so a burst of large messages cannot lock out the outbox worker.
        self.batch_bytes = batch_bytes
        self.clock = clock
        self.on_commit = on_commit
        # Longest a spooled message waits for the pipeline; 0: nothing is ever spooled.
        self.spool_seconds = spool_seconds
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        # Submitted, not yet handed to the writer: per event loop, touched on its thread.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Set with the stop marker, under the lock: a loop handing over later answers
        # its jobs itself, for the writer would never take them.
        self._stop_sent = False
        self._hand_lock = threading.Lock()
        self.redone = 0  # batches the fast path gave up (a bad message, a conflict)
        self._busy = _Decayed()  # seconds the writer spent, on whatever batches
        # Seconds the arrivals asked of the pipeline: inline batches as they took, and
        # for each message spooled instead what its pipeline run will cost. While they
        # would saturate the writer, it leaves the spool alone; draining does not count
        # here, or it would keep itself from draining.
        self._demand = _Decayed()
        # Pipeline seconds per message in a batch of at least COST_BATCH (a moving
        # average): what draining a spooled message costs. Small batches are not
        # counted: their commit's fixed cost, spread over one or two messages, would
        # make 100 messages/second look like a burst.
        self._cost = 0.002
        # The spool as this writer knows it: how many, and per spooled batch [count
        # left, monotonic time spooled], oldest first (for `spool_seconds`).
        self._spooled = 0
        self._spool_batches: collections.deque[list[float]] = collections.deque()
        self._retry_at = 0.0
        # Drains in a row that took messages and failed; while any, one row at a time.
        self._drain_failures = 0
        self._spool_empty = threading.Event()
        self._spool_empty.set()

    def start(self) -> None:
        self._stopping = False
        self._stop_sent = False
        self._spool_empty.clear()  # until the writer has looked at what is there
        self._thread = threading.Thread(target=self._run, name="intake-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish every submitted message, then stop the writer thread.

        Spooled messages stay in the spool, committed: the next start processes them."""
        if self._thread is None:
            return
        self._stopping = True
        # What was submitted in this turn of the loop goes before the stop marker, or it
        # would never be answered. (Another loop's turn may end after the marker: its
        # hand-over then answers StoreUnavailable.)
        self._hand_over(asyncio.get_running_loop())
        with self._hand_lock:
            self._stop_sent = True
            self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._spooled:  # (the count may be one high: the last look was not made)
            log.info("intake: stopped with messages in the spool; the next start "
                     "processes them first")

    async def submit(self, inbound: Inbound, *, deferrable: bool = False) -> Disposition:
        """Ingest one message; with `deferrable`, under a burst it may be spooled instead
        (committed all the same) and answered `Outcome.QUEUED`."""
        if self._thread is None or self._stopping:
            # After stop() began, a job queued behind the stop marker would never be
            # answered; refusing it makes SMTP say 451 and the sender retry later.
            raise StoreUnavailable("intake is not running")
        loop = asyncio.get_running_loop()
        job = _Job(inbound, loop.create_future(), loop, deferrable)
        # Handed to the writer once per turn of the loop, with every message that
        # completed in the same turn: each put wakes the writer thread, which then
        # fights the loop for the GIL while the loop still has those messages to read.
        # 10-15% more messages a second under a burst (docs/performance.md).
        pending = self._pending.setdefault(loop, [])
        if not pending:
            loop.call_soon(self._hand_over, loop)
        pending.append(job)
        return await job.future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """On `loop`'s thread: give the writer what `submit` collected in this turn."""
        jobs = self._pending.pop(loop, [])
        with self._hand_lock:
            if not self._stop_sent:
                for job in jobs:
                    self._queue.put(job)
                return
        # Behind the stop marker the writer would never take them: SMTP answers 451.
        error = StoreUnavailable("intake is not running")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    async def spool_drained(self) -> None:
        """Return once nothing is spooled (every accepted message has been through the
        pipeline)."""
        await asyncio.to_thread(self._spool_empty.wait)

    def spooled(self) -> int:
        """Messages spooled and not yet through the pipeline, as the writer counts them."""
        return self._spooled

    def load(self, now: float | None = None) -> float:
        """About what share of its recent time (a quarter second or so) the writer spent on
        batches, or would have without the spool, from 0 to 1.

        An exponentially decayed sum of busy time: `busy / LOAD_TAU` tends to the
        busy fraction under steady load and falls towards 0 once the writer idles.
        """
        now = time.monotonic() if now is None else now
        return min(1.0, max(self._busy.at(now), self._demand.at(now)) / LOAD_TAU)

    def note_busy(self, started: float, ended: float) -> None:
        """Count a batch of arrivals that kept the writer busy from `started` to `ended`
        (monotonic)."""
        self._busy.add(ended, ended - started)
        self._demand.add(ended, ended - started)

    def ingest_now(self, inbound: Inbound) -> Disposition:
        """Synchronous ingest of one message (CLI `quarantine retry`, tests)."""
        return self._process_batch([inbound])[0]

    # -- worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._count_spool()
        while True:
            try:
                first = self._queue.get(timeout=self._wait(time.monotonic()))
            except queue.Empty:  # nothing arrived meanwhile: time for the spool
                self._drain()
                continue
            if first is _STOP:
                return
            jobs, stop = self._gather(first)
            self._take(jobs)
            # Once overdue, as many drained as arrived (in spool batches), or the spool,
            # and the delay of every ticket, would grow for as long as a storm lasts.
            owed = len(jobs)
            now = time.monotonic()
            while (owed > 0 and self._spooled and self._overdue(now)
                   and now >= self._retry_at):
                self._drain()
                owed -= SPOOL_BATCH
                now = time.monotonic()
            if stop:
                return

    def _gather(self, first: object) -> tuple[list[_Job], bool]:
        """`first` and whatever else waits, up to the batch limits; True if a stop came."""
        assert isinstance(first, _Job)
        jobs = [first]
        size = len(first.inbound.raw)
        while len(jobs) < self.batch_max and size < self.batch_bytes:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return jobs, True
            assert isinstance(nxt, _Job)
            jobs.append(nxt)
            size += len(nxt.inbound.raw)
        return jobs, False

    def _take(self, jobs: list[_Job]) -> None:
        """Run a batch of arrivals: spool the deferrable ones under a burst (or behind
        a spool), run the rest through the pipeline."""
        if not self.spool_seconds:
            # Nothing is spooled now, but what a run with the spool on left there goes
            # first: a follow-up must not overtake its question.
            while self._spooled and time.monotonic() >= self._retry_at:
                self._drain()
        started = time.monotonic()
        later = [j for j in jobs if j.deferrable] if self.spool_seconds > 0 else []
        # A burst: a queue has formed, QUEUE_FORMED or more waited for this batch. Under
        # a steady, merely heavy load (a message or two per batch, the writer busy most
        # of the time) spooling would only put a drain batch in front of each arrival.
        if later and (self._spooled or len(later) >= QUEUE_FORMED):
            now_ = [j for j in jobs if not j.deferrable]
            self._spool(later)
        else:
            now_, later = jobs, []
        if now_:
            self._run_batch(now_)
        ended = time.monotonic()
        self._busy.add(ended, ended - started)
        if later:
            self._demand.add(ended, len(later) * self._cost)
        else:
            self._demand.add(ended, ended - started)
            self._learn_cost(ended - started, len(now_))

    def _learn_cost(self, seconds: float, messages: int) -> None:
        if messages >= COST_BATCH:
            self._cost = 0.8 * self._cost + 0.2 * seconds / messages

    def _wait(self, now: float) -> float | None:
        """How long the writer may wait for arrivals before it turns to the spool."""
        if not self._spooled:
            return None
        if now < self._retry_at:
            return self._retry_at - now
        if self._overdue(now):
            return 0.0
        demand = self._demand.at(now) / LOAD_TAU
        if demand < SATURATED:
            return 0.0
        # Until the arrivals so far would no longer saturate the writer.
        return LOAD_TAU * math.log(demand / SATURATED) + 0.001

    def _overdue(self, now: float) -> bool:
        return bool(self._spool_batches) and now - self._spool_batches[0][1] >= self.spool_seconds

    def _count_spool(self) -> None:
        """What an earlier run left in the spool is processed first (it is overdue)."""
        try:
            with self.sessions() as session:
                left = spool.count(session)
        except Exception as exc:
            # Drain as if something were there: the first drain that finds the spool
            # empty ends it, and new SMTP mail waits behind what an earlier run left.
            log.error("intake: could not count the spool: %s", exc)
            self._spool_added(1, -math.inf)
            return
        if left:
            log.info("intake: %d spooled message(s) from an earlier run", left)
            self._spool_added(left, -math.inf)
        else:
            self._spool_empty.set()

    def _spool_added(self, count: int, at: float) -> None:
        self._spooled += count
        self._spool_batches.append([count, at])
        self._spool_empty.clear()

    def _spool(self, jobs: list[_Job]) -> None:
        results: list[Disposition] | BaseException
        try:
            # A Core connection, not a session: a fifth of the writer's cost per message.
            with self.sessions.kw["bind"].begin() as connection:
                spool.put(connection, [j.inbound for j in jobs])
        except Exception as exc:
            log.error("store: %d message(s) not spooled: %s", len(jobs), exc)
            results = StoreUnavailable(str(exc))
            if not self._spooled:
                # A commit that failed may have been made all the same (its answer
                # lost): look, rather than leave rows no one counted until a restart.
                self._spool_added(1, time.monotonic())
        else:
            self._spool_added(len(jobs), time.monotonic())
            results = [Disposition(Outcome.QUEUED, reason="spooled under a burst")] * len(jobs)
        self._answer(jobs, results)

    def _drain(self) -> None:
        """Run the oldest spooled messages through the pipeline, one batch.

        After a failed drain the next ones take a single message: a batch that failed
        for one message's sake then gets through up to it, and that message alone,
        failing POISON_TRIES times, is quarantined as it is. If the store itself is
        down, every drain fails and the writer keeps trying every SPOOL_RETRY_S."""
        started = time.monotonic()
        ids: list[int] = []
        try:
            with self.sessions() as session:
                ids = spool.next_batch(session, 1 if self._drain_failures else SPOOL_BATCH,
                                       self.batch_bytes)
            if not ids:  # the spool is empty: only a look that finds it so ends it
                self._spooled = 0
            else:
                inbounds, results = self._process(claim=ids)
                for inbound, result in zip(inbounds, results, strict=True):
                    log_disposition(inbound, result)
                # The count is this writer's: rows it did not count (another daemon's on
                # the same database, whose drain then took some of ours) are there all
                # the same, so it looks again rather than take its count for the table.
                self._spooled = max(1, self._spooled - len(ids))
        except Exception as exc:
            # A look that failed tried no message, and a store that is down is no
            # message's fault: neither is a try.
            if ids and not isinstance(exc, STORE_DOWN):
                self._drain_failures += 1
            if (len(ids) == 1 and self._drain_failures >= POISON_TRIES
                    and self._set_aside(ids[0], exc)):
                self._drain_failures = 0
                self._drained(1)
                return
            log.error("store: spooled messages not processed, again in %.0f s: %s",
                      SPOOL_RETRY_S, exc)
            self._retry_at = time.monotonic() + SPOOL_RETRY_S
            return
        finally:
            ended = time.monotonic()
            self._busy.add(ended, ended - started)
        self._drain_failures = 0
        self._learn_cost(ended - started, len(ids))
        self._drained(len(ids))

    def _set_aside(self, row_id: int, error: Exception) -> bool:
        """Quarantine spooled message `row_id` as it is; False if that failed too."""
        detail = f"{type(error).__name__}: {error}"[:2000].replace("\x00", "\\x00")
        try:
            with self.sessions() as session, session.begin():
                for inbound in spool.claim(session, [row_id]):
                    row = quarantine(session, inbound, StageError(
                        "spool", f"failed {POISON_TRIES} times", detail), inbound.received_at)
                    log.warning("spooled message from %s quarantined as #%d: it failed %d "
                                "times: %s", inbound.source, row.id, POISON_TRIES, detail)
        except Exception as exc:
            log.error("store: spooled message %d not quarantined either: %s", row_id, exc)
            return False
        if self._spooled:
            self._spooled = max(1, self._spooled - 1)
        return True

    def _drained(self, taken: int) -> None:
        """Count `taken` spooled messages done, oldest first."""
        while taken and self._spool_batches:
            first = self._spool_batches[0]
            used = min(taken, int(first[0]))
            first[0] -= used
            taken -= used
            if first[0] <= 0:
                self._spool_batches.popleft()
        if not self._spooled:
            self._spool_batches.clear()
            self._spool_empty.set()

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            results: list[Disposition] | BaseException = self._process_batch(
                [j.inbound for j in jobs]
            )
        except Exception as exc:
            log.error("store: batch of %d message(s) not committed: %s", len(jobs), exc)
            results = StoreUnavailable(str(exc))
        self._answer(jobs, results)

    def _answer(self, jobs: list[_Job], results: list[Disposition] | BaseException) -> None:
        # One wake-up per event loop and batch, not per message: each wake-up is a write
        # to the loop's self-pipe and a turn of the loop.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Disposition],
                                                             int]]] = {}
        for i, job in enumerate(jobs):
            by_loop.setdefault(job.loop, []).append((job.future, i))
        for loop, futures in by_loop.items():
            loop.call_soon_threadsafe(_resolve, futures, results)

    def _process_batch(self, inbounds: list[Inbound]) -> list[Disposition]:
        return self._process(inbounds)[1]

    def _process(
        self, inbounds: list[Inbound] | None = None, claim: list[int] | None = None,
    ) -> tuple[list[Inbound], list[Disposition]]:
        """The pipeline over `inbounds`, or over the spooled messages `claim` names (taken
        out of the spool in the same transaction); returns what ran and its results."""
        now = self.clock()
        try:
            inbounds, results = self._fast(inbounds, claim, now)
        except Exception as exc:
            # Nothing of the batch is stored: go again, one savepoint per message.
            self.redone += 1
            log.info("intake: batch of %d redone message by message (%s: %s)",
                     len(inbounds or claim or ()), type(exc).__name__, str(exc)[:200])
            inbounds, results = self._safe(inbounds, claim, now)
        if self.on_commit is not None and results:
            # Committed is committed: a failing wake-up must not turn into a 451.
            try:
                self.on_commit(results)
            except Exception:
                log.exception("intake: after-commit callback failed")
        return inbounds, results

    def _fast(
        self, inbounds: list[Inbound] | None, claim: list[int] | None, now: dt.datetime,
    ) -> tuple[list[Inbound], list[Disposition]]:
        """The whole batch, autoflush off, one flush at the commit; raises on any failure."""
        with self.sessions() as session:
            track(session)
            try:
                with session.begin(), session.no_autoflush:
                    if claim is not None:
                        inbounds = spool.claim(session, claim)
                    assert inbounds is not None
                    mails = self.pipeline.prepare(session, inbounds, now)
                    results = [self.pipeline.ingest(session, inbound, now, mail)
                               for inbound, mail in zip(inbounds, mails, strict=True)]
                    finish(session)
                return inbounds, results
            finally:
                untrack(session)

    def _safe(
        self, inbounds: list[Inbound] | None, claim: list[int] | None, now: dt.datetime,
    ) -> tuple[list[Inbound], list[Disposition]]:
        with self.sessions() as session, session.begin():
            if claim is not None:
                inbounds = spool.claim(session, claim)
            assert inbounds is not None
            return inbounds, [self._one(session, inbound, now) for inbound in inbounds]

    def _one(self, session: Session, inbound: Inbound, now: dt.datetime) -> Disposition:
        try:
            with session.begin_nested():
                return self.pipeline.ingest(session, inbound, now)
        except StageError as exc:
            error = exc
        except STORE_DOWN:
            raise
        except Exception as exc:  # a bug must not lose the message
            log.exception("pipeline bug on message from %s", inbound.source)
            error = StageError("pipeline", type(exc).__name__, str(exc)[:2000])
        with session.begin_nested():
            row = quarantine(session, inbound, error, now)
        log.warning("message from %s quarantined as #%d: %s: %s", inbound.source, row.id,
                    error.stage, error.reason)
        return Disposition(Outcome.QUARANTINED, reason=f"{error.stage}: {error.reason}")


def log_disposition(inbound: Inbound, result: Disposition) -> None:
    """The daemon's one log line per message: its Message-ID, outcome and ticket. (A
    spooled message gets its line when the pipeline has run on it; being spooled is
    only worth a debug line.)"""
    level = logging.DEBUG if result.outcome == Outcome.QUEUED else logging.INFO
    if not log.isEnabledFor(level):  # once per message: skip building the arguments
        return
    log.log(level, "%s: message %s -> %s%s%s", inbound.source, result.message_id or "-",
             result.outcome.value, f" ticket {result.ticket}" if result.ticket else "",
             f" ({result.reason})" if result.reason else "")


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
