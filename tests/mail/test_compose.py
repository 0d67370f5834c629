"""compose(): Outbound -> RFC 5322 bytes, checked by parsing the bytes back (B1, B23)."""

from __future__ import annotations

import datetime as dt
import email.policy
import re
from email.header import decode_header, make_header
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail.compose import ComposeError, compose, encode_address, make_message_id
from gateway.message import Address, Attachment, Outbound

DATE = dt.datetime(2026, 11, 27, 10, 30, tzinfo=dt.UTC)
HOOK = "[Ticket#2026112700012]"
HELP = Address("help@helpdesk.test", "EOSC Helpdesk")
DANA = Address("dana@users.test", "Dana User")


def outbound(**overrides: object) -> Outbound:
    fields: dict[str, object] = {
        "sender": HELP,
        "to": (DANA,),
        "subject": f"{HOOK} Cannot log in",
        "text": "Hello Dana,\n\nwe received your request.\n",
    }
    fields.update(overrides)
    return Outbound(**fields)  # type: ignore[arg-type]


def raw_of(out: Outbound, message_id: str = "1a2b.c3d4@helpdesk.test") -> bytes:
    return compose(out, message_id=message_id, date=DATE, loop_value="help@helpdesk.test")


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def body_text(part: MIMEPart) -> str:
    """Decoded text of a part, line breaks as LF (the parser keeps the wire's CRLF)."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def header_block(raw: bytes) -> bytes:
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep
    return head


def assert_wire_clean(raw: bytes) -> None:
    """B23: CRLF only, 7-bit, no line over 998 octets, and each header field well formed."""
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert raw.isascii(), "8-bit octets on the wire"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    for line in header_block(raw).split(b"\r\n"):
        assert line[:1] in (b" ", b"\t") or re.match(rb"[!-9;-~]+:", line), line


def field(raw: bytes, name: str) -> str:
    """The unfolded raw value of header `name` (first occurrence)."""
    text = header_block(raw).decode("ascii").replace("\r\n ", " ")
    [value] = [
        line.split(":", 1)[1].strip()
        for line in text.split("\r\n")
        if line.lower().startswith(name.lower() + ":")
    ][:1]
    return value


def rfc2047_name(raw: bytes, name: str) -> str:
    """The display name of a one-mailbox field decoded the RFC 2047 way.

    Python's address parser keeps the white space between adjacent encoded words
    (RFC 2047 §6.2 says to drop it), so exact checks of long encoded names use the
    legacy decoder, which follows the RFC.
    """
    phrase = field(raw, name).rsplit(" <", 1)[0]
    if phrase.startswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    return str(make_header(decode_header(phrase)))


def squash(value: str) -> str:
    """`value` without white space: what Python's display-name parser gets right."""
    return "".join(value.split())


def names(raw: bytes) -> list[str]:
    return [k.lower() for k in parse(raw).keys()]  # noqa: SIM118 (duplicates matter)


# -- headers ----------------------------------------------------------------------------


def test_typical_notification_headers() -> None:
    out = outbound(
        cc=(Address("eve@users.test", "Eve"),),
        reply_to=Address("help+2026112700012.abcdef@helpdesk.test", "EOSC Helpdesk"),
        auto_submitted="auto-generated",
    )
    raw = raw_of(out)
    assert_wire_clean(raw)
    msg = parse(raw)
    assert str(msg["From"]) == "EOSC Helpdesk <help@helpdesk.test>"
    assert str(msg["To"]) == "Dana User <dana@users.test>"
    assert str(msg["Cc"]) == "Eve <eve@users.test>"
    assert str(msg["Reply-To"]) == "EOSC Helpdesk <help+2026112700012.abcdef@helpdesk.test>"
    assert msg["Subject"] == f"{HOOK} Cannot log in"
    assert msg["Date"].datetime == DATE
    assert msg["Message-ID"] == "<1a2b.c3d4@helpdesk.test>"
    assert msg["X-Loop"] == "help@helpdesk.test"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert body_text(msg) == "Hello Dana,\n\nwe received your request.\n"
    assert "bcc" not in names(raw)
    # Every field exactly once.
    assert len(names(raw)) == len(set(names(raw)))


def test_header_lines_fold_within_78_for_ordinary_text() -> None:
    subject = HOOK + " " + " ".join(["word"] * 60)
    many = tuple(Address(f"person{i}@users.test", f"Person Number {i}") for i in range(12))
    raw = raw_of(outbound(subject=subject, cc=many))
    assert_wire_clean(raw)
    assert max(len(line) for line in header_block(raw).split(b"\r\n")) <= 78
    msg = parse(raw)
    assert msg["Subject"] == subject
    assert [a.addr_spec for a in msg["Cc"].addresses] == [a.address for a in many]


def test_hook_stays_readable_in_raw_subject() -> None:
    raw = raw_of(outbound(subject=f"{HOOK} Grüße aus Köln"))
    assert b"Subject: " + HOOK.encode() in raw
    assert parse(raw)["Subject"] == f"{HOOK} Grüße aus Köln"


def test_empty_to_becomes_undisclosed_group() -> None:
    raw = raw_of(outbound(to=(), cc=(DANA,)))
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg["To"].addresses == ()
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["dana@users.test"]


# -- header injection --------------------------------------------------------------------


@pytest.mark.parametrize(
    "evil",
    [
        "Hi\r\nBcc: evil@attacker.test",
        "Hi\nBcc: evil@attacker.test",
        "Hi\rBcc: evil@attacker.test",
        "Hi\r\n\r\nBcc: evil@attacker.test",
        "Hi\x00\x0bBcc: evil@attacker.test",
        "Hi\u2028Bcc: evil@attacker.test",
        "Hi\x85Bcc: evil@attacker.test",
        "Hi\x1cBcc: evil@attacker.test",
    ],
)
def test_subject_line_breaks_cannot_inject(evil: str) -> None:
    raw = raw_of(outbound(subject=evil))
    assert_wire_clean(raw)
    msg = parse(raw)
    assert "bcc" not in names(raw)
    assert msg["Subject"] == "Hi Bcc: evil@attacker.test"
    assert body_text(msg) == "Hello Dana,\n\nwe received your request.\n"


@pytest.mark.parametrize(
    "evil",
    [
        "=?utf-8?q?Hi=0D=0ABcc:_evil@attacker.test?=",
        "Re: =?utf-8?b?SGkNCkJjYzogZXZpbEBhdHRhY2tlci50ZXN0?= more",
        "=?us-ascii?q?x=0ABcc=3A_evil=40attacker=2Etest?=",
    ],
)
def test_encoded_word_in_subject_cannot_inject(evil: str) -> None:
    # A customer can send a subject that decodes to the *text* of an encoded word;
    # it must travel as text, never turn into a header line (the stdlib
    # EmailMessage/policy.SMTP route emits "Bcc:" here on Python 3.11.7).
    raw = raw_of(outbound(subject=evil))
    assert_wire_clean(raw)
    assert "bcc" not in names(raw)
    assert parse(raw)["Subject"] == evil


@pytest.mark.parametrize(
    "name",
    [
        "Eve <evil@attacker.test>, bcc@attacker.test",
        'Eve" <evil@attacker.test>, "x',
        '"' * 500,  # escaping doubles it: more than a header line may hold
        "\\" * 700,
        "Eve\r\nBcc: evil@attacker.test",
        'Eve\\", evil@attacker.test',
        "Eve (comment) ; group: x@y;",
        "=?utf-8?q?Eve_=3Cevil=40attacker=2Etest=3E=2C_x=40y?=",
        "Ève <evil@attacker.test>, bcc@attacker.test",
    ],
)
def test_display_name_cannot_add_recipients(name: str) -> None:
    out = outbound(
        sender=Address("help@helpdesk.test", name),
        to=(Address("dana@users.test", name),),
        cc=(Address("carol@users.test", name),),
        reply_to=Address("help+1.t@helpdesk.test", name),
    )
    raw = raw_of(out)
    assert_wire_clean(raw)
    msg = parse(raw)
    assert "bcc" not in names(raw)
    expected = " ".join(name.replace("\r\n", " ").split())
    for name_, addr in [
        ("From", "help@helpdesk.test"),
        ("To", "dana@users.test"),
        ("Cc", "carol@users.test"),
        ("Reply-To", "help+1.t@helpdesk.test"),
    ]:
        [parsed] = msg[name_].addresses
        assert parsed.addr_spec == addr
        assert squash(parsed.display_name) == squash(expected)
        assert not msg[name_].defects
        assert rfc2047_name(raw, name_) == expected


@pytest.mark.parametrize(
    "address",
    [
        "dana@users.test\r\nBcc: evil@attacker.test",
        "dana@users.test, evil@attacker.test",
        "Dana <dana@users.test>",
        "dana users.test",
        "dana@",
        "@users.test",
        "dana@users test",
        "dänä@users.test",
        "dana@-bad-.test",
        "",
    ],
)
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ComposeError):
        raw_of(outbound(to=(Address(address),)))
    with pytest.raises(ComposeError):
        encode_address(address)


def test_address_encoding() -> None:
    assert encode_address("dana@users.test") == "dana@users.test"
    assert encode_address("dana@bücher.example") == "dana@xn--bcher-kva.example"
    assert encode_address("a,b@users.test") == '"a,b"@users.test'
    assert encode_address('"a b"@users.test'.replace(" ", "")) == "ab@users.test"
    assert encode_address("x@[192.0.2.1]") == "x@[192.0.2.1]"
    raw = raw_of(outbound(to=(Address("a,b@users.test", "A B"),)))
    [parsed] = parse(raw)["To"].addresses
    assert parsed.username == "a,b"
    assert parsed.domain == "users.test"


@pytest.mark.parametrize(
    "name",
    ["X Bad", "X:Bad", "", "Xé", "X-\r\nBcc", "X" * 77],
)
def test_invalid_extra_header_names_are_refused(name: str) -> None:
    with pytest.raises(ComposeError, match="invalid header field name"):
        raw_of(outbound(extra_headers=((name, "v"),)))


@pytest.mark.parametrize(
    "name",
    [
        "Bcc",
        "bcc",
        "From",
        "TO",
        "Cc",
        "Subject",
        "Reply-To",
        "Message-ID",
        "Date",
        "In-Reply-To",
        "References",
        "Content-Type",
        "content-transfer-encoding",
        "MIME-Version",
        "Auto-Submitted",
        "X-Loop",
        "Resent-To",
        "Return-Path",
    ],
)
def test_extra_headers_cannot_override(name: str) -> None:
    with pytest.raises(ComposeError, match="may not be set"):
        raw_of(outbound(extra_headers=((name, "evil@attacker.test"),)))


def test_extra_headers_are_appended_and_sanitised() -> None:
    raw = raw_of(
        outbound(
            extra_headers=(
                ("X-Helpdesk-Ticket", "2026112700012"),
                ("List-Id", "Support <support.helpdesk.test>"),
                ("X-Note", "a\r\nBcc: evil@attacker.test ünïcode"),
            )
        )
    )
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg["X-Helpdesk-Ticket"] == "2026112700012"
    assert msg["List-Id"] == "Support <support.helpdesk.test>"
    assert msg["X-Note"] == "a Bcc: evil@attacker.test ünïcode"
    assert "bcc" not in names(raw)


# -- RFC 2047 round trips -------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        f"{HOOK} Grüße aus Köln",
        f"{HOOK} Не могу войти в систему",
        f"{HOOK} ログインできません",
        f"{HOOK} 🔥 fire 🔥 everywhere 🔥",
        "ä" * 300,
        f"{HOOK} " + "Überweisung " * 40,
        "mixed ünïcödé and plain ascii words " * 10,
        "a" * 950,
        "",
    ],
)
def test_non_ascii_subject_round_trips(subject: str) -> None:
    raw = raw_of(outbound(subject=subject))
    assert_wire_clean(raw)
    assert parse(raw)["Subject"] == subject.strip()


@pytest.mark.parametrize(
    "name",
    [
        "Jörg Müller",
        "Jörg Müller-Lüdenscheidt von und zu Überlänge " * 3,
        "Александра Владимировна Петрова-Водкина",
        "山田太郎",
        "Donaudampfschifffahrtsgesellschaftskapitänsmützenbändel",
    ],
)
def test_non_ascii_display_names_round_trip(name: str) -> None:
    raw = raw_of(outbound(to=(Address("j@users.test", name),)))
    assert_wire_clean(raw)
    [parsed] = parse(raw)["To"].addresses
    assert parsed.addr_spec == "j@users.test"
    assert squash(parsed.display_name) == squash(name)
    assert rfc2047_name(raw, "To") == name.strip()
    # Encoded words break after a space where they can, never inside a word that fits.
    if " " in name and len(name.encode()) > 45:
        assert "Überl änge" not in parsed.display_name


_header_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]),
    max_size=200,
)


def _cleaned(value: str) -> str:
    return " ".join(re.sub("[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", value).split())


@settings(max_examples=300, deadline=None)
@given(subject=_header_text, name=_header_text)
def test_any_subject_and_name_survive(subject: str, name: str) -> None:
    raw = raw_of(outbound(subject=subject, to=(Address("dana@users.test", name),)))
    assert_wire_clean(raw)
    msg = parse(raw)
    assert sorted(names(raw)) == sorted(
        [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "x-loop",
            "mime-version",
            "content-type",
            "content-transfer-encoding",
        ]
    )
    assert msg["Subject"] == _cleaned(subject)
    [parsed] = msg["To"].addresses
    assert parsed.addr_spec == "dana@users.test"
    assert squash(parsed.display_name) == squash(_cleaned(name))
    if _cleaned(name):
        assert rfc2047_name(raw, "To") == _cleaned(name)


# -- threading ----------------------------------------------------------------------------


def test_in_reply_to_and_references() -> None:
    out = outbound(
        in_reply_to="c3@users.test",
        references=("a1@helpdesk.test", "<b2@users.test>", "a1@helpdesk.test", "c3@users.test"),
    )
    msg = parse(raw_of(out))
    assert msg["In-Reply-To"] == "<c3@users.test>"
    assert msg["References"].split() == ["<a1@helpdesk.test>", "<b2@users.test>", "<c3@users.test>"]


def test_parent_is_last_in_references() -> None:
    out = outbound(in_reply_to="<p@users.test>", references=("p@users.test", "q@users.test"))
    assert parse(raw_of(out))["References"] == "<q@users.test> <p@users.test>"


def test_empty_html_adds_no_alternative() -> None:
    assert parse(raw_of(outbound(html=""))).get_content_type() == "text/plain"


def test_long_message_ids_are_never_encoded() -> None:
    long_id = "CAF" + "x" * 120 + "=Q@mail.gmail.com"
    refs = tuple(f"{i}.{'y' * 60}@example.org" for i in range(10))
    raw = raw_of(outbound(in_reply_to=long_id, references=refs))
    assert_wire_clean(raw)
    assert b"=?" not in header_block(raw)
    assert f"<{long_id}>".encode() in raw
    msg = parse(raw)
    assert msg["In-Reply-To"] == f"<{long_id}>"
    assert msg["References"].split() == [f"<{r}>" for r in (*refs, long_id)]


def test_junk_message_ids_are_cleaned_or_dropped() -> None:
    out = outbound(
        in_reply_to="<c3@users.test>\r\nBcc: evil@attacker.test",
        references=("", "  ", "<>", "a b@x", "\x00", "<<x@y>>", "ü@x", " <ok@users.test> "),
    )
    raw = raw_of(out)
    assert_wire_clean(raw)
    assert "bcc" not in names(raw)
    assert "in-reply-to" not in names(raw)
    assert parse(raw)["References"] == "<ok@users.test>"


def test_references_keep_root_and_latest() -> None:
    refs = tuple(f"m{i}@users.test" for i in range(50))
    msg = parse(raw_of(outbound(references=refs, in_reply_to="last@users.test")))
    ids = msg["References"].split()
    assert len(ids) == 30
    assert ids[0] == "<m0@users.test>"
    assert ids[-1] == "<last@users.test>"
    assert ids[-2] == "<m49@users.test>"


def test_no_threading_headers_without_parent() -> None:
    raw = raw_of(outbound())
    assert "in-reply-to" not in names(raw)
    assert "references" not in names(raw)


# -- automatic mail (RFC 3834) --------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto-replied", "auto-generated"])
def test_auto_submitted_present(value: str) -> None:
    msg = parse(raw_of(outbound(auto_submitted=value)))
    assert msg["Auto-Submitted"] == value
    assert msg["X-Auto-Response-Suppress"] == "All"


def test_auto_submitted_absent_for_relayed_replies() -> None:
    raw = raw_of(outbound(auto_submitted=None))
    assert "auto-submitted" not in names(raw)
    assert "x-auto-response-suppress" not in names(raw)


def test_auto_submitted_no() -> None:
    msg = parse(raw_of(outbound(auto_submitted="no")))
    assert msg["Auto-Submitted"] == "no"
    assert msg["X-Auto-Response-Suppress"] is None


def test_auto_submitted_value_is_validated() -> None:
    with pytest.raises(ComposeError):
        raw_of(outbound(auto_submitted="auto-replied\r\nBcc: evil@attacker.test"))


# -- bodies ----------------------------------------------------------------------------


def test_long_single_line_body() -> None:
    text = "x" * 5000
    raw = raw_of(outbound(text=text))
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert body_text(msg) == text + "\n"


def test_long_single_line_non_ascii_body() -> None:
    text = "Grüße " * 1000
    raw = raw_of(outbound(text=text))
    assert_wire_clean(raw)
    assert body_text(parse(raw)) == text + "\n"


def test_mostly_non_ascii_body_uses_base64() -> None:
    text = "Здравствуйте, мы получили ваш запрос.\n" * 5
    raw = raw_of(outbound(text=text))
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert body_text(msg) == text


def test_ascii_body_stays_7bit_and_line_ends_are_normalised() -> None:
    raw = raw_of(outbound(text="one\r\ntwo\rthree\nfour"))
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert body_text(msg) == "one\ntwo\nthree\nfour\n"


def test_control_characters_in_body_are_encoded() -> None:
    text = "nul\x00 bell\x07 esc\x1b tab\tend  \n.dot\nFrom me\n"
    raw = raw_of(outbound(text=text))
    assert_wire_clean(raw)
    assert b"\x00" not in raw
    assert body_text(parse(raw)) == text


def test_html_alternative() -> None:
    html = "<p>Hello <b>Dana</b> — we received your request.</p>" + "<br>" * 400
    raw = raw_of(outbound(html=html))
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert body_text(parts[0]) == "Hello Dana,\n\nwe received your request.\n"
    assert body_text(parts[1]) == html + "\n"
    body = msg.get_body(preferencelist=("html",))
    assert body is not None
    assert body.get_content_type() == "text/html"
    assert all(p["MIME-Version"] is None for p in parts)


# -- attachments -------------------------------------------------------------------------

BINARY = bytes(range(256)) * 40


@pytest.mark.parametrize(
    "filename",
    [
        "report.pdf",
        "Grüße aus Köln.pdf",
        "Отчёт за ноябрь 2026.xlsx",
        "日本語のファイル名.txt",
        "Überlänge " * 20 + ".pdf",
        "x" * 200 + ".bin",
        'quote " and back\\slash; semi=colon.txt',
        "=?utf-8?q?a=0D=0AContent-Type:_text/html?=.txt",
        "two\r\nlines.txt",
    ],
)
def test_attachment_names_round_trip(filename: str) -> None:
    att = Attachment(filename=filename, content_type="application/pdf", data=BINARY)
    raw = raw_of(outbound(attachments=(att,)))
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    [part] = list(msg.iter_attachments())
    assert part.get_filename() == _cleaned(filename)
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == BINARY
    assert part.get_content_disposition() == "attachment"
    assert not part["Content-Disposition"].defects
    # The encoded-word-looking name stays inside its parameter.
    assert [k.lower() for k in part.keys()] == [  # noqa: SIM118
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
    ]


def test_attachments_with_html_and_odd_types() -> None:
    forwarded = b"From: a@b.test\r\nSubject: fwd\r\n\r\nhello\r\n"
    atts = (
        Attachment("notes.txt", "text/plain; charset=iso-8859-1", "Grüße".encode("latin-1")),
        Attachment("weird.bin", "not a type", b"\x00\xff"),
        Attachment("logo.png", "image/png", b"\x89PNG\r\n", content_id="<logo@x>", inline=True),
        Attachment("original.eml", "message/rfc822", forwarded),
        Attachment("binary.eml", "message/rfc822", b"Subject: x\r\n\r\n\xff\xfe"),
        Attachment("", "application/octet-stream", b""),
    )
    raw = raw_of(outbound(html="<p>hi</p>", attachments=atts))
    assert_wire_clean(raw)
    msg = parse(raw)
    first, *rest = list(msg.iter_parts())
    assert first.get_content_type() == "multipart/alternative"
    notes, weird, logo, original, binary, empty = rest
    assert notes.get_content_type() == "text/plain"
    assert notes.get_content_charset() == "iso-8859-1"
    assert body_text(notes) == "Grüße"
    assert weird.get_content_type() == "application/octet-stream"
    assert weird.get_content() == b"\x00\xff"
    assert logo.get_content_disposition() == "inline"
    assert logo["Content-ID"] == "<logo@x>"
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] == "7bit"
    assert original.get_content()["Subject"] == "fwd"
    assert binary.get_content_type() == "application/octet-stream"
    assert binary.get_content() == b"Subject: x\r\n\r\n\xff\xfe"
    assert empty.get_filename() is None
    assert empty.get_content() == b""


@pytest.mark.parametrize("ctype", ["text/html", "TEXT/HTML; charset=utf-8", "image/svg+xml"])
def test_attachments_that_would_run_script_go_as_opaque_files(ctype: str) -> None:
    """B23: no HTML part with script, attachments included (an agent relays a
    customer's invoice.html, a chat user sends an .svg)."""
    page = b"<p>Invoice</p><script>steal()</script>"
    raw = raw_of(outbound(attachments=(Attachment("invoice.html", ctype, page),)))
    [_, att] = list(parse(raw).iter_parts())
    assert att.get_content_type() == "application/octet-stream"
    assert att.get_filename() == "invoice.html" and att.get_content() == page


# -- identifiers and arguments ---------------------------------------------------------------


def test_make_message_id() -> None:
    ids = {make_message_id("helpdesk.test") for _ in range(2000)}
    assert len(ids) == 2000
    for ident in ids:
        assert ident.endswith("@helpdesk.test")
        assert "<" not in ident and ">" not in ident
        assert re.fullmatch(r"[0-9a-f]+\.[0-9a-f]+@helpdesk\.test", ident)
    assert make_message_id("Bücher.Example").endswith("@xn--bcher-kva.example")


def test_a_forked_process_draws_other_random_parts_than_its_parent() -> None:
    """Random parts come from a buffer of OS randomness; a fork must not share it."""
    import os

    make_message_id("helpdesk.test")  # the buffer is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, make_message_id("helpdesk.test").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    os.close(read)
    os.close(write)
    ours = make_message_id("helpdesk.test")
    assert child.split(".")[1] != ours.split(".")[1]


@pytest.mark.parametrize("domain", ["", "bad domain", "a@b", "x\r\ny", "<x>"])
def test_make_message_id_refuses_bad_domains(domain: str) -> None:
    with pytest.raises(ComposeError):
        make_message_id(domain)


@pytest.mark.parametrize("mid", ["<a@b>", "a b@c", "no-at-sign", "a@b\r\nBcc: x@y", ""])
def test_compose_refuses_bad_message_id(mid: str) -> None:
    with pytest.raises(ComposeError):
        raw_of(outbound(), message_id=mid)


def test_compose_refuses_naive_date() -> None:
    with pytest.raises(ComposeError):
        compose(outbound(), message_id="a@b", date=dt.datetime(2026, 1, 1), loop_value="x")


def test_date_keeps_offset() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    when = dt.datetime(2026, 11, 27, 11, 30, tzinfo=cet)
    raw = compose(outbound(), message_id="a@b", date=when, loop_value="help@helpdesk.test")
    assert b"Date: Fri, 27 Nov 2026 11:30:00 +0100\r\n" in raw
    assert parse(raw)["Date"].datetime == when


def test_loop_value_is_required_and_sanitised() -> None:
    with pytest.raises(ComposeError):
        compose(outbound(), message_id="a@b", date=DATE, loop_value="\r\n")
    raw = compose(outbound(), message_id="a@b", date=DATE, loop_value="help@x\r\nBcc: y@z")
    assert parse(raw)["X-Loop"] == "help@x Bcc: y@z"
    assert "bcc" not in names(raw)
