"""Automatic-mail classification (B17), loop detection (B19) and report parsing (B18)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.mail.auto import AutoInfo, Report, classify, is_loop, parse_report
from gateway.mail.parse import ParseError, parse_mail
from gateway.message import Attachment, ParsedMail

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail"


def mail(*headers: str, body: str = "hello\n") -> tuple[bytes, ParsedMail]:
    raw = ("\n".join(["From: Customer <customer@example.com>", *headers]) + "\n\n" + body).encode()
    return raw, parse_mail(raw)


def info(*headers: str, mail_from: str | None = None) -> AutoInfo:
    return classify(mail(*headers)[1], mail_from)


# --- classify ---------------------------------------------------------------------------


def test_ordinary_mail_is_not_automatic() -> None:
    result = info("Subject: my printer is broken", mail_from="customer@example.com")
    assert result == AutoInfo(is_automatic=False, reasons=(), is_report=False)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Auto-Submitted: auto-replied", "auto-submitted:auto-replied"),
        ("Auto-Submitted: auto-generated (failure)", "auto-submitted:auto-generated"),
        ("Auto-Submitted: Auto-Notified; owner-email=x@y", "auto-submitted:auto-notified"),
        ("Precedence: bulk", "precedence:bulk"),
        ("Precedence: JUNK", "precedence:junk"),
        ("Precedence: list", "precedence:list"),
        ("X-Autoreply: yes", "x-autoreply"),
        ("X-Autorespond: Out of office", "x-autorespond"),
        ("X-Auto-Response-Suppress: All", "x-auto-response-suppress:all"),
        ("X-Auto-Response-Suppress: DR, OOF, AutoReply", "x-auto-response-suppress:autoreply,oof"),
        ("List-Id: Users <users.lists.example.org>", "list-id"),
        ("List-Unsubscribe: <mailto:leave@lists.example.org>", "list-unsubscribe"),
        ("Return-Path: <>", "return-path:null"),
        ("Return-Path: < > (bounce)", "return-path:null"),
        (
            "Content-Type: multipart/report; report-type=delivery-status; boundary=x",
            "content-type:multipart/report",
        ),
    ],
)
def test_each_automatic_header(header: str, reason: str) -> None:
    result = info(header)
    assert result.is_automatic
    assert reason in result.reasons


@pytest.mark.parametrize(
    "header",
    [
        "Auto-Submitted: no",
        "Auto-Submitted: No (a person wrote this)",
        "Precedence: first-class",
        "X-Auto-Response-Suppress: DR, RN, NRN",
        "Return-Path: <customer@example.com>",
        "X-Loop: something",
    ],
)
def test_non_automatic_headers(header: str) -> None:
    assert info(header) == AutoInfo(False, (), False)


def test_null_envelope_sender() -> None:
    assert info(mail_from="").reasons == ("null-sender",)
    # No envelope known (IMAP): says nothing either way.
    assert not info(mail_from=None).is_automatic
    assert not info(mail_from="customer@example.com").is_automatic


def test_multipart_report_is_a_report() -> None:
    result = info(
        "Content-Type: multipart/report; report-type=disposition-notification; boundary=b"
    )
    assert result.is_report and result.is_automatic


@pytest.mark.parametrize(
    ("from_header", "mail_from", "reason"),
    [
        ("From: MAILER-DAEMON@mx.example.com", None, "sender:mailer-daemon"),
        ("From: Mail Delivery System <Postmaster@example.org>", None, "sender:postmaster"),
        ("From: MAILER-DAEMON (Mail Delivery System)", None, "sender:mailer-daemon"),
        ("From: someone@example.com", "postmaster@example.com", "sender:postmaster"),
    ],
)
def test_daemon_senders(from_header: str, mail_from: str | None, reason: str) -> None:
    raw = f"{from_header}\nSubject: Undelivered Mail\n\nsorry\n".encode()
    result = classify(parse_mail(raw), mail_from)
    assert reason in result.reasons


def test_daemon_like_names_are_not_daemons() -> None:
    raw = b"From: mailer-daemon-fan@example.com\nSubject: hi\n\nhi\n"
    assert not classify(parse_mail(raw), None).is_automatic


@pytest.mark.parametrize(
    "subject",
    [
        "Automatic reply: Printer",
        "Auto reply: Printer",
        "AutoReply",
        "Automatische Antwort: Drucker",
        "Abwesenheitsnotiz: Drucker",
        "RE: Abwesenheitsnotiz",
        "Réponse automatique : Imprimante",
        "Respuesta automática: Impresora",
        "Risposta automatica: Stampante",
        "Automatisch antwoord: Printer",
        "Autosvar: Skrivare",
        "Auto: Printer",
        "Out of Office: Printer",
        "Out of Office AutoReply: Printer",
        "Out of office",
        "Jane Doe is out of the office.",
        "=?UTF-8?Q?AutoRespons?= :Nyaan?",
    ],
)
def test_out_of_office_subjects_are_a_hint_only(subject: str) -> None:
    # B17 decides by headers; a person may write such a subject (see auto.py).
    result = info(f"Subject: {subject}")
    assert result.reasons == ("hint:subject-auto-reply",)
    assert not result.is_automatic


@pytest.mark.parametrize(
    "subject",
    [
        "Out of office hours support is broken",
        "Re: the printer out of office 3",
        "Automation question",
        "Automatic replies are annoying",
        "Vacation request for next week",
        "autobahn",
    ],
)
def test_ordinary_subjects(subject: str) -> None:
    assert not info(f"Subject: {subject}").is_automatic


# --- is_loop ----------------------------------------------------------------------------

LOOP = "helpdeskd@helpdesk.test"
OWN = frozenset({"helpdesk.test"})


def test_loop_header() -> None:
    _, parsed = mail("X-Loop: HelpdeskD@Helpdesk.Test")
    assert is_loop(parsed, loop_value=LOOP, own_domains=OWN) == "x-loop:HelpdeskD@Helpdesk.Test"


def test_own_message_id_domain() -> None:
    # Forwarding may strip Auto-Submitted and Precedence; the Message-ID survives.
    _, parsed = mail("Message-ID: <20240604.abc@HELPDESK.test>")
    assert is_loop(parsed, loop_value=LOOP, own_domains=OWN) == "message-id:helpdesk.test"


@pytest.mark.parametrize(
    "header",
    [
        "X-Loop: someone-else@example.com",
        "Message-ID: <abc@example.com>",
        "Message-ID: <abc@sub.helpdesk.test>",
        "Message-ID: <helpdesk.test@example.com>",
        "Message-ID: no-at-sign",
        "Subject: no id at all",
    ],
)
def test_not_a_loop(header: str) -> None:
    _, parsed = mail(header)
    assert is_loop(parsed, loop_value=LOOP, own_domains=OWN) is None


# --- parse_report -----------------------------------------------------------------------

DSN = """\
From: Mail Delivery System <MAILER-DAEMON@mx.example.com>
To: helpdesk@helpdesk.test
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
Message-ID: <bounce.1@mx.example.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com
Arrival-Date: Tue, 4 Jun 2024 10:00:00 +0200

Final-Recipient: rfc822; Gone@Example.org
Original-Recipient: rfc822;gone@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address
    rejected: User unknown

Final-Recipient: rfc822; slow@example.net
Action: delayed
Status: 4.4.1
Will-Retry-Until: Wed, 5 Jun 2024 10:00:00 +0200

Final-Recipient: rfc822; fine@example.net
Action: delivered
Status: 2.0.0

--B
Content-Type: message/rfc822

From: agent@helpdesk.test
To: gone@example.org
Subject: [Ticket#2024060400001] Your printer
Message-ID: <out.42@helpdesk.test>

the original
--B--
"""


def test_delivery_status_notification() -> None:
    raw = DSN.encode()
    parsed = parse_mail(raw)
    assert classify(parsed, "").is_report
    report = parse_report(raw, parsed)
    assert report is not None
    assert report.kind == "delivery-status"
    assert report.original_message_ids == ("out.42@helpdesk.test",)
    assert report.statuses == ("5.1.1", "4.4.1", "2.0.0")
    assert report.failed_recipients == ("gone@example.org", "slow@example.net")
    assert report.permanent is True
    for part in ("gone@example.org", "failed", "5.1.1", "User unknown", "bad destination mailbox"):
        assert part in report.summary
    assert "\n" not in report.summary


def test_delayed_only_is_not_permanent() -> None:
    raw = DSN.replace("Status: 5.1.1", "Status: 4.2.2").encode()
    report = parse_report(raw, parse_mail(raw))
    assert report is not None
    assert report.permanent is False
    assert "4.2.2" in report.statuses


def test_dsn_with_headers_only_original() -> None:
    raw = DSN.replace(
        "Content-Type: message/rfc822\n\nFrom: agent",
        "Content-Type: text/rfc822-headers\n\nFrom: agent",
    ).encode()
    report = parse_report(raw, parse_mail(raw))
    assert report is not None
    assert report.original_message_ids == ("out.42@helpdesk.test",)


MDN = """\
From: Customer <customer@example.com>
To: helpdesk@helpdesk.test
Subject: Read: [Ticket#2024060400001] Your printer
Message-ID: <mdn.7@example.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification; boundary="M"

--M
Content-Type: text/plain

The message was displayed.
--M
Content-Type: message/disposition-notification

Reporting-UA: customer.example.com; Mail.app
Original-Recipient: rfc822;customer@example.com
Final-Recipient: rfc822;customer@example.com
Original-Message-ID: <out.43@helpdesk.test>
Disposition: manual-action/MDN-sent-manually; displayed

--M--
"""


def test_message_disposition_notification() -> None:
    raw = MDN.encode()
    parsed = parse_mail(raw)
    assert classify(parsed, None).is_report
    report = parse_report(raw, parsed)
    assert report is not None
    assert report.kind == "disposition"
    assert report.original_message_ids == ("out.43@helpdesk.test",)
    assert (report.statuses, report.failed_recipients, report.permanent) == ((), (), False)
    assert "customer@example.com" in report.summary
    assert "displayed" in report.summary


def test_in_reply_to_counts_as_original() -> None:
    raw = (
        b"From: postmaster@example.org\nIn-Reply-To: <out.44@helpdesk.test>\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        b"--B\nContent-Type: text/plain\n\nRemote server said: 550 5.7.1 rejected\n--B--\n"
    )
    report = parse_report(raw, parse_mail(raw))
    assert report is not None
    assert report.original_message_ids == ("out.44@helpdesk.test",)
    # No machine-readable part: the enhanced code in the text is used.
    assert report.statuses == ("5.7.1",)
    assert report.kind == "delivery-status"


def test_report_fields_in_the_wrong_place_are_found() -> None:
    # The delivery-status fields ended up in a text part (broken MTA).
    raw = (
        b"From: postmaster@example.org\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        b"--B\nContent-Type: text/plain\n\nFinal-Recipient: rfc822; x@example.org\nAction: failed\n"
        b"Status: 5.2.2\n\n--B\nContent-Type: text/plain\n\nMessage-ID: <out.45@helpdesk.test>\n"
        b"--B--\n"
    )
    report = parse_report(raw, parse_mail(raw))
    assert report is not None
    assert report.statuses == ("5.2.2",)
    assert report.failed_recipients == ("x@example.org",)
    assert "out.45@helpdesk.test" in report.original_message_ids


def test_nothing_to_report_gives_none() -> None:
    raw, parsed = mail("Content-Type: multipart/report; boundary=b", body="--b\n\nnothing\n--b--\n")
    assert parse_report(raw, parsed) is None


def test_parse_report_never_raises() -> None:
    rng = random.Random(7)
    base = DSN.encode()
    parsed = parse_mail(base)
    for _ in range(200):
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
        mangled = ParsedMail(
            **{
                **{f: getattr(parsed, f) for f in ParsedMail.__dataclass_fields__},
                "attachments": (
                    Attachment("x", "message/delivery-status", junk),
                    Attachment("y", "message/rfc822", junk[::-1]),
                ),
            }
        )
        result = parse_report(junk + base[: rng.randrange(len(base))], mangled)
        assert result is None or isinstance(result, Report)


# --- the corpus -------------------------------------------------------------------------


def corpus(name: str) -> tuple[bytes, ParsedMail]:
    raw = (CORPUS / name).read_bytes()
    return raw, parse_mail(raw)


@pytest.mark.parametrize(
    "name",
    [
        "sisimai/bsd__rfc3834-01.eml",
        "sisimai/bsd__rfc3834-02.eml",
        "sisimai/bsd__rfc3834-03.eml",
        "sisimai/bsd__rfc3834-04.eml",
        "sisimai/bsd__rfc3834-05.eml",
        "sisimai/bsd__rfc3834-06.eml",
        "sisimai/bsd__lhost-qmail-01.eml",
        "sisimai/bsd__lhost-exim-01.eml",
        "flanker/bounce__gmail-invalid-address.eml",
        "mail-parser/mail_test_16.eml",
    ],
)
def test_corpus_automatic_mail(name: str) -> None:
    _, parsed = corpus(name)
    assert classify(parsed, None).is_automatic


@pytest.mark.parametrize(
    ("name", "status", "original"),
    [
        ("flanker/bounce__zed.eml", "5.1.1", "20090708054735.GC7578@example.com"),
        ("flanker/bounce__mailbox-full.eml", "5.2.2", "4E326A95.3010907@example.com"),
        (
            "sisimai/bsd__lhost-postfix-48.eml",
            "5.0.0",
            "20160429233445.8FDCD7D68ECB@mail.example.com",
        ),
        (
            "ruby-mail/multipart_report_emails__report_422.eml",
            "4.2.2",
            "15655788.13.1200472642578.JavaMail.Administrator@mail.ttttt.com.au",
        ),
        ("cpython/msg_25.eml", "5.4.6", "01040616033903.00962@server"),
    ],
)
def test_corpus_bounces(name: str, status: str, original: str) -> None:
    raw, parsed = corpus(name)
    assert classify(parsed, "").is_report
    report = parse_report(raw, parsed)
    assert report is not None
    assert report.kind == "delivery-status"
    assert status in report.statuses
    assert original in report.original_message_ids
    assert report.permanent == status.startswith("5.")
    assert status in report.summary


def test_corpus_read_receipt() -> None:
    raw, parsed = corpus("flanker/disposition-notification.eml")
    report = parse_report(raw, parsed)
    assert report is not None
    assert report.kind == "disposition"
    assert report.original_message_ids == ("199509192301.23456@example.org",)


def test_corpus_reports_never_raise() -> None:
    for path in sorted(CORPUS.rglob("*.eml")):
        raw = path.read_bytes()
        try:
            parsed = parse_mail(raw)
        except ParseError:
            continue
        result = classify(parsed, None)
        if result.is_report:
            report = parse_report(raw, parsed)
            assert report is None or isinstance(report, Report)
