"""When to fire: one APScheduler timer at the earliest alarm in the database, plus a sweep.

This module's sole purpose is *waking up* `SlaEngine.fire_due` at the right
moment; what firing does, and that it happens once, is the engine's business
(the database claim), not this module's. The parts:

* an ``AsyncIOScheduler`` (APScheduler 3.x) on the daemon's event loop with two
  jobs: ``sla:timer``, a date trigger armed at the earliest ``next_escalation_at``
  of any ticket, and ``sla:sweep``, an interval trigger (``[escalation]
  sweep_seconds``, default 300) that catches what another daemon committed;
* `after_commit`, chained to the intake's ``on_commit``: ticket changes may have
  brought an alarm forward (the engine remembers the earliest it wrote), so the
  timer is moved earlier without asking the database;
* one runner task that does the firing passes, off the event loop
  (`asyncio.to_thread`), one at a time, coalescing wake-ups that arrive meanwhile,
  and re-arms the timer from the database after each pass.

Time: the daemon's ``clock`` is the truth (tests pass a settable one, or move
time with time-machine). APScheduler keeps its own wall clock, so the timer is
armed ``due - clock()`` seconds from APScheduler's "now", and `kick` re-arms
after a test has moved the clock: nothing in here sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gateway.escalation.engine import FireStats, SlaEngine

log = logging.getLogger(__name__)

TIMER_JOB: Final = "sla:timer"
SWEEP_JOB: Final = "sla:sweep"


class EscalationScheduler:
    """Arms, re-arms and runs the firing of SLA alarms for one daemon."""

    def __init__(
        self,
        engine: SlaEngine,
        clock: Callable[[], dt.datetime],
        *,
        sweep_seconds: float = 300.0,
        on_fired: Callable[[FireStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        self.on_fired = on_fired
        #: The alarm instant (daemon clock) the timer is armed for; None: unarmed.
        self.armed_at: dt.datetime | None = None
        #: Firing passes completed, and what the last one did (tests, bench, logs).
        self.passes = 0
        self._begun = 0
        self.last: FireStats = FireStats()
        self.totals: FireStats = FireStats()
        self._scheduler: AsyncIOScheduler | None = None
        # Re-arms in flight (sequence -> earliest offer seen while it queried the database)
        # and the newest one applied: a slow, stale re-arm must not undo a newer alarm.
        self._seq = 0
        self._applied = 0
        self._active: dict[int, dt.datetime | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wanted = asyncio.Event()
        # Set by stop(): the runner ends after the pass in flight, between two batches.
        self._stopping = threading.Event()
        self._runner: asyncio.Task[None] | None = None
        self._done = asyncio.Condition()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start APScheduler, arm the timer from the database; fire what fell due meanwhile."""
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=dt.UTC)
        # misfire_grace_time=None: an alarm is never dropped for being late (a busy loop,
        # a suspended VM); coalesce: several missed sweeps are one sweep.
        scheduler.add_job(self._wake, "interval", seconds=self.sweep_seconds, id=SWEEP_JOB,
                          coalesce=True, misfire_grace_time=None, max_instances=1)
        scheduler.start()
        self._scheduler = scheduler
        self._runner = asyncio.create_task(self._run(), name="escalation:runner")
        # The first pass fires what fell due while no daemon was running, then arms.
        self._wanted.set()

    async def stop(self) -> None:
        """Stop the timer and the sweep; a pass in flight ends after its current batch."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._scheduler = None
        self._stopping.set()
        self._wanted.set()
        if self._runner is not None:
            # Not cancelled: a worker thread in the middle of a transaction would outlive
            # the task and race the engine's disposal. It returns at the next batch.
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        self.armed_at = None

    # -- arming --------------------------------------------------------------------------

    def after_commit(self) -> None:
        """Thread-safe (the intake calls it on its thread after each commit)."""
        earliest = self.engine.take_earliest()
        if earliest is None or self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing during shutdown
            self._loop.call_soon_threadsafe(self._offer, earliest)

    def _offer(self, at: dt.datetime) -> None:
        """Move the timer earlier if `at` comes first; a later `at` changes nothing.

        An alarm that moved *later* (a ticket answered) leaves the timer early: it
        wakes, finds nothing due and re-arms from the database.
        """
        for seq, seen in self._active.items():
            if seen is None or at < seen:
                self._active[seq] = at
        if self.armed_at is None or at < self.armed_at:
            self._arm(at)

    def _arm(self, at: dt.datetime | None) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        self.armed_at = at
        if at is None:
            with contextlib.suppress(Exception):
                scheduler.remove_job(TIMER_JOB)
            return
        delay = max(0.0, (at - self.clock()).total_seconds())
        run_date = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        scheduler.add_job(self._wake, "date", run_date=run_date, id=TIMER_JOB,
                          replace_existing=True, misfire_grace_time=None, coalesce=True)
        log.debug("escalation: timer armed for %s (in %.1f s)", at.isoformat(), delay)

    async def rearm(self) -> dt.datetime | None:
        """Arm the timer at the earliest alarm in the database; returns that instant."""
        self._seq += 1
        seq = self._seq
        self._active[seq] = None
        try:
            at = await asyncio.to_thread(self.engine.next_due)
        finally:
            # A commit that landed after the query began announced itself through _offer.
            offered = self._active.pop(seq)
        if offered is not None and (at is None or offered < at):
            at = offered
        if seq > self._applied:
            self._applied = seq
            self._arm(at)
        return at

    async def kick(self) -> int:
        """Re-arm now (after the clock moved) and wait for the pass that follows, if any.

        Returns the number of passes completed so far. Used by tests and the CLI-less
        bench; the daemon itself never needs it.
        """
        # A pass already running may have read the clock before it moved: wait for one
        # that begins after this call.
        wanted = self._begun + 1
        at = await self.rearm()
        if at is not None and at <= self.clock():
            # Ask for the pass outright: the timer just armed may already have been
            # replaced by a newer re-arm of a pass that began before this call.
            self._wanted.set()
            await self.wait_passes(wanted)
        return self.passes

    async def wait_passes(self, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until `count` firing passes have completed."""
        async with asyncio.timeout(timeout), self._done:
            await self._done.wait_for(lambda: self.passes >= count)

    # -- firing --------------------------------------------------------------------------

    async def _wake(self) -> None:
        # APScheduler runs this coroutine on our loop; the pass itself runs in _run, so a
        # timer and a sweep that meet coalesce into one pass instead of queueing.
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            if self._stopping.is_set():
                return
            try:
                await self._pass()
            except Exception:
                log.exception("escalation: firing pass failed; the sweep will retry")
                with contextlib.suppress(Exception):
                    self._arm(self.clock() + dt.timedelta(seconds=min(60.0, self.sweep_seconds)))

    async def _pass(self) -> None:
        self._begun += 1
        now = self.clock()
        stats = await asyncio.to_thread(self.engine.fire_due, now, stop=self._stopping)
        self.last = stats
        for name, value in stats.as_dict().items():
            setattr(self.totals, name, getattr(self.totals, name) + value)
        if stats:
            log.info("escalation: pass at %s: %s", now.isoformat(),
                     ", ".join(f"{k} {v}" for k, v in stats.as_dict().items() if v))
            if self.on_fired is not None:
                self.on_fired(stats)
        await self.rearm()
        async with self._done:
            self.passes += 1
            self._done.notify_all()

    def status(self) -> dict[str, Any]:
        """For logs and the bench: what is armed and what has been done."""
        return {"armed_at": self.armed_at.isoformat() if self.armed_at else None,
                "passes": self.passes, "totals": self.totals.as_dict()}
