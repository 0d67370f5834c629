"""Every public corpus email becomes a ticket or is quarantined with a reason (B20).

The whole corpus goes through the real pipeline into a real store; outbound mail
is only written to the outbox and never delivered (no worker runs here), so no
acknowledgement reaches the real-looking addresses in the corpus.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from support.corpus import CORPUS

from gateway.config import Settings
from gateway.daemon import App
from gateway.message import Channel, Inbound
from gateway.pipeline import Outcome
from gateway.store.models import Event, OutboxRow, Participant, QuarantineRow, Ticket

FILES = sorted(CORPUS.rglob("*.eml"))


def test_corpus_is_present() -> None:
    assert len(FILES) == 296, f"expected the 296 corpus messages under {CORPUS}"


def test_every_corpus_message_is_a_ticket_or_quarantined(settings: Settings) -> None:
    app = App(settings)
    outcomes: dict[Path, Outcome] = {}
    for path in FILES:
        inbound = Inbound(
            channel=Channel.EMAIL, raw=path.read_bytes(),
            received_at=dt.datetime.now(dt.UTC), source=f"corpus:{path.name}",
            mail_from=None, rcpt_tos=("help@helpdesk.test",),
        )
        outcomes[path] = app.intake.ingest_now(inbound).outcome
    tally = Counter(outcomes.values())
    # Nothing vanished: every message has a recorded fate.
    assert sum(tally.values()) == len(FILES)
    allowed = {Outcome.CREATED, Outcome.FOLLOWUP, Outcome.NOTE, Outcome.DUPLICATE,
               Outcome.IGNORED, Outcome.QUARANTINED}
    assert set(tally) <= allowed, tally
    with app.sessions() as s:
        held = list(s.scalars(select(QuarantineRow)))
        assert s.scalar(select(func.count()).select_from(QuarantineRow)) == tally[
            Outcome.QUARANTINED]
    assert all(q.stage and q.reason for q in held)
    # The Outlook .msg is not RFC 5322: quarantined, with a reason.
    msg = CORPUS / "mail-parser" / "mail_outlook_1.eml"
    assert outcomes[msg] == Outcome.QUARANTINED
    # Well-formed mail is never quarantined (B20): only what is no mail at all
    # (no header block) or has nobody to answer (no From, Reply-To or envelope sender).
    assert {(q.stage, q.reason) for q in held} <= {
        ("parse", "not-rfc5322"), ("parse", "no-headers"), ("normalise", "no-sender")}
    app.engine.dispose()


def test_the_corpus_in_batches_is_decided_as_one_message_at_a_time(
    settings: Settings, tmp_path: Path
) -> None:
    """The intake's fast path (a batch with one flush) against one message per batch,
    on real-world mail: duplicates, follow-ups and quarantines within a batch included.
    The batched run uses this test's backend; the reference run a SQLite of its own.
    Not only the outcomes are the same, but what each ticket stores: its audit trail
    and participants in order, and its outbox rows (the fast path writes these rows
    apart from the ORM's flush)."""
    from support.app import demo_config

    from gateway.config import parse_settings

    def inbound(path: Path) -> Inbound:
        return Inbound(channel=Channel.EMAIL, raw=path.read_bytes(),
                       received_at=dt.datetime.now(dt.UTC), source=f"corpus:{path.name}",
                       mail_from=None, rcpt_tos=("help@helpdesk.test",))

    batched_app = App(settings)
    batched = []
    for i in range(0, len(FILES), 16):
        batched += batched_app.intake._process_batch([inbound(p) for p in FILES[i:i + 16]])
    batched_rows = stored(batched_app)
    batched_app.engine.dispose()

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single_settings = parse_settings(
        demo_config(single_dir, f"sqlite:///{single_dir / 'single.sqlite3'}"),
        base_dir=single_dir, environ={})
    single_app = App(single_settings)
    single = [single_app.intake.ingest_now(inbound(p)) for p in FILES]
    single_rows = stored(single_app)
    single_app.engine.dispose()

    def decided(results: list[Any]) -> list[tuple[str, str | None, str]]:
        return [(r.outcome.value, r.ticket, r.reason) for r in results]

    assert decided(batched) == decided(single)
    assert Counter(r.outcome for r in batched)[Outcome.FOLLOWUP] > 0  # threading was used
    assert batched_rows == single_rows
    assert sum(len(rows["events"]) for rows in batched_rows.values()) >= 2 * len(batched_rows)


def stored(app: App) -> dict[str, dict[str, list[Any]]]:
    """Per ticket number: its events, participants and outbox rows, each in id order."""
    with app.sessions() as session:
        numbers: dict[int, str] = {
            tid: number for tid, number in session.execute(select(Ticket.id, Ticket.number))}
        rows: dict[str, dict[str, list[Any]]] = {
            n: {"events": [], "participants": [], "outbox": []} for n in numbers.values()}
        for e in session.scalars(select(Event).order_by(Event.id)):
            rows[numbers[e.ticket_id]]["events"].append((e.kind, e.actor))
        for p in session.scalars(select(Participant).order_by(Participant.id)):
            rows[numbers[p.ticket_id]]["participants"].append((p.address, p.name, p.role))
        for o in session.scalars(select(OutboxRow).order_by(OutboxRow.id)):
            assert o.ticket_id is not None
            rows[numbers[o.ticket_id]]["outbox"].append(
                (o.kind, o.to_address, tuple(o.recipients), o.automatic, o.state, o.payload))
    return rows


async def test_the_corpus_through_the_spool_is_decided_as_without_it(
    settings: Settings, tmp_path: Path
) -> None:
    """Every corpus message accepted under a burst (committed to the spool, 250 given)
    gets the fate it gets without the spool, in the same order: a ticket, a follow-up,
    a note, a duplicate, ignored or quarantined. None is lost in the spool."""
    from support.app import demo_config

    from gateway.config import parse_settings
    from gateway.store import spool
    from gateway.store.models import SpoolRow

    def inbound(path: Path) -> Inbound:
        return Inbound(channel=Channel.EMAIL, raw=path.read_bytes(),
                       received_at=dt.datetime.now(dt.UTC), source=f"corpus:{path.name}",
                       mail_from=None, rcpt_tos=("help@helpdesk.test",))

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference_app = App(parse_settings(
        demo_config(reference_dir, f"sqlite:///{reference_dir / 'ref.sqlite3'}"),
        base_dir=reference_dir, environ={}))
    reference = [reference_app.intake.ingest_now(inbound(p)).outcome for p in FILES]
    reference_app.engine.dispose()

    app = App(settings, run_outbox=False)  # nothing is delivered anywhere
    with app.sessions() as s, s.begin():
        spool.put(s, [inbound(p) for p in FILES])
    decided: list[Outcome] = []
    after_commit = app.intake.on_commit

    def noted(results: list[Any]) -> None:
        decided.extend(r.outcome for r in results)
        if after_commit is not None:
            after_commit(results)

    app.intake.on_commit = noted
    await app.start()
    try:
        await app.intake.spool_drained()
    finally:
        await app.stop()
    assert decided == reference
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(SpoolRow)) == 0
        assert s.scalar(select(func.count()).select_from(QuarantineRow)) == Counter(
            reference)[Outcome.QUARANTINED]
