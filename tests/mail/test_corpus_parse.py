"""parse_mail over every message of the shared corpus: a ParsedMail or a ParseError, nothing else.

The corpus lives beside the checkout (shared/corpus/mail; see its README). Two
files are not mail and must be refused with a reason: the Outlook .msg (OLE2
binary) and a bare digest body without any header line. Everything else,
however broken, must parse (B20), and what it parses to must be safe to copy
into headers and to store (no CR/LF in header-derived text, no lone
surrogates, aware dates, bare Message-IDs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mail.parse import ParseError, parse_mail
from gateway.message import ParsedMail

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail"
FILES = sorted(CORPUS.rglob("*.eml"))

NOT_MAIL = {
    "mail-parser/mail_outlook_1.eml": "not-rfc5322",
    # No header block at all: the body of a list digest (manifest: "no header block").
    "cpython/msg_19.eml": "no-headers",
}
REASONS = {"empty", "not-rfc5322", "no-headers", "parser-failure"}


def test_corpus_is_present() -> None:
    assert len(FILES) >= 290, f"corpus not found under {CORPUS}"
    assert all(name in {f.relative_to(CORPUS).as_posix() for f in FILES} for name in NOT_MAIL)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CORPUS).as_posix())
def test_parses_or_refuses_with_a_reason(path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    name = path.relative_to(CORPUS).as_posix()
    raw = path.read_bytes()
    try:
        mail = parse_mail(raw)
    except ParseError as error:
        assert error.reason in REASONS
        assert error.detail
        assert NOT_MAIL.get(name) == error.reason, f"{name}: {error}"
    else:
        assert name not in NOT_MAIL, f"{name} should have been refused"
        check_invariants(mail)
    assert capfd.readouterr() == ("", "")


def check_invariants(mail: ParsedMail) -> None:
    header_texts = [mail.subject, *(value for _, value in mail.headers)]
    header_texts += [a.name for a in (*mail.to, *mail.cc, *mail.reply_to)]
    header_texts += [a.filename for a in mail.attachments]
    if mail.sender is not None:
        header_texts.append(mail.sender.name)
    for text in header_texts:
        assert "\r" not in text and "\n" not in text, text
        assert "\x00" not in text
    for text in [*header_texts, mail.text, mail.html or "", *mail.defects]:
        text.encode("utf-8")  # raises on lone surrogates
    assert "\x00" not in mail.text
    for address in (mail.sender, *mail.to, *mail.cc, *mail.reply_to):
        if address is not None:
            assert address.address == address.address.lower()
            assert "@" in address.address
    if mail.date is not None:
        assert mail.date.tzinfo is not None
    for message_id in (mail.message_id, *mail.in_reply_to, *mail.references):
        if message_id is not None:
            assert message_id and not message_id.startswith("<") and not message_id.endswith(">")
    for attachment in mail.attachments:
        assert isinstance(attachment.data, bytes)
        assert attachment.filename
        assert "/" not in attachment.filename and "\\" not in attachment.filename


def test_outlook_msg_is_not_rfc5322() -> None:
    with pytest.raises(ParseError) as caught:
        parse_mail((CORPUS / "mail-parser" / "mail_outlook_1.eml").read_bytes())
    assert caught.value.reason == "not-rfc5322"


@pytest.mark.parametrize(
    ("name", "subject", "sender", "text_start"),
    [
        ("ruby-mail/plain_emails__basic_email.eml", "Testing 123", "test@lindsaar.net", "Plain"),
        ("ruby-mail/rfc6532__utf8_headers.eml", "Säying Hello", "jdöe@mächine.example", ""),
        ("ruby-mail/multi_charset__japanese_iso_2022.eml", "まみむめも", "raasdnil@gmail.com", ""),
        (
            "flanker/bilingual-simple.eml",
            "Simple text. How are you? Как ты поживаешь?",
            "hello@example.com",
            "",
        ),
        ("django-helpdesk/quoted_printable.eml", "Český test", "tim.thelion@gmail.com", ""),
        (
            "sisimai/mac__lhost-verizon-01.eml",
            "Undeliverable Message",
            "sysadmin@m01.vzwpix.com",
            "Message could not be delivered",
        ),
    ],
)
def test_corpus_samples(name: str, subject: str, sender: str, text_start: str) -> None:
    mail = parse_mail((CORPUS / name).read_bytes())
    assert mail.subject == subject
    assert mail.sender is not None and mail.sender.address == sender
    assert mail.text.startswith(text_start)


def test_corpus_attachment_names() -> None:
    mail = parse_mail(
        (CORPUS / "ruby-mail" / "multi_charset__japanese_attachment.eml").read_bytes()
    )
    assert [a.filename for a in mail.attachments] == ["てすと.txt"]
    mail = parse_mail(
        (
            CORPUS / "ruby-mail" / "attachment_emails__attachment_with_quoted_filename.eml"
        ).read_bytes()
    )
    assert [a.filename for a in mail.attachments] == ["Eelanalüüsi päring.jpg"]
