"""parse_mail on hand-built messages: headers, addresses, bodies, attachments, non-mail."""

from __future__ import annotations

import base64
import datetime as dt
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mail.parse import ParseError, parse_mail
from gateway.message import Address, ParsedMail


def build(headers: str, body: str | bytes = "hello\n", *, eol: str = "\n") -> bytes:
    """A message from a header block (LF-separated in the source) and a body."""
    head = eol.join(headers.strip("\n").split("\n")) + eol + eol
    raw_body = body if isinstance(body, bytes) else body.replace("\n", eol).encode()
    return head.encode("utf-8") + raw_body


BASIC = """\
From: "Jane Q. Customer" <Jane.Customer@Example.COM>
To: Help Desk <help@helpdesk.test>, other@example.org
Cc: =?utf-8?q?J=C3=BCrgen?= <juergen@example.de>
Reply-To: replies@example.com
Subject: Printer on fire
Date: Tue, 04 Jun 2024 10:15:00 +0200
Message-ID: <abc.123@example.com>
In-Reply-To: <parent@example.com>
References: <root@example.com>
 <parent@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
"""


def test_basic_message() -> None:
    mail = parse_mail(build(BASIC, "It is really on fire.\n"))
    assert isinstance(mail, ParsedMail)
    assert mail.subject == "Printer on fire"
    assert mail.sender == Address("jane.customer@example.com", "Jane Q. Customer")
    assert mail.to == (
        Address("help@helpdesk.test", "Help Desk"),
        Address("other@example.org", ""),
    )
    assert mail.cc == (Address("juergen@example.de", "Jürgen"),)
    assert mail.reply_to == (Address("replies@example.com"),)
    assert mail.date == dt.datetime(2024, 6, 4, 8, 15, tzinfo=dt.UTC)
    assert mail.date is not None and mail.date.tzinfo is not None
    assert mail.message_id == "abc.123@example.com"
    assert mail.in_reply_to == ("parent@example.com",)
    assert mail.references == ("root@example.com", "parent@example.com")
    assert mail.text == "It is really on fire.\n"
    assert mail.html is None
    assert mail.attachments == ()
    assert mail.defects == ()
    assert mail.header("subject") == "Printer on fire"
    assert mail.header("references") == "<root@example.com> <parent@example.com>"
    assert [name for name, _ in mail.headers][:3] == ["From", "To", "Cc"]
    assert mail.header("Cc") == "Jürgen <juergen@example.de>"


def test_crlf_and_lf_give_the_same_result() -> None:
    lf = parse_mail(build(BASIC, "line one\nline two\n"))
    crlf = parse_mail(build(BASIC, "line one\nline two\n", eol="\r\n"))
    cr = parse_mail(build(BASIC, "line one\nline two\n", eol="\r"))
    assert lf == crlf == cr
    assert lf.text == "line one\nline two\n"


def test_mixed_line_endings() -> None:
    raw = b"From: a@example.com\r\nSubject: mixed\nTo: b@example.com\r\n\r\none\rtwo\r\nthree\n"
    mail = parse_mail(raw)
    assert mail.subject == "mixed"
    assert mail.to == (Address("b@example.com"),)
    assert mail.text == "one\ntwo\nthree\n"


def test_mbox_from_line_and_leading_blank_lines() -> None:
    raw = (
        b"\r\n\r\nFrom MAILER-DAEMON Mon Sep 20 19:29:27 2021\n"
        b"From: a@example.com\nSubject: s\n\nb\n"
    )
    mail = parse_mail(raw)
    assert mail.subject == "s"
    assert mail.sender == Address("a@example.com")
    assert all(name.lower() != "from " for name, _ in mail.headers)


def test_headers_without_body_separator() -> None:
    raw = b"From: a@example.com\nSubject: no blank line\nthis line is body text\nand this\n"
    mail = parse_mail(raw)
    assert mail.subject == "no blank line"
    assert "this line is body text" in mail.text
    assert any("blank line" in d for d in mail.defects)


def test_stray_line_in_header_block_is_a_continuation() -> None:
    raw = (
        b"Received: from x by y\r\nReceived-SPF: softfail\r\nquite Delivered-To: a@b\r\n"
        b"From: Real Sender <real@example.com>\r\nSubject: kept\r\n\r\nbody\r\n"
    )
    mail = parse_mail(raw)
    assert mail.sender == Address("real@example.com", "Real Sender")
    assert mail.subject == "kept"
    assert mail.header("Received-SPF") == "softfail quite Delivered-To: a@b"
    assert mail.text == "body\n"


def test_body_without_separator_is_not_taken_for_headers() -> None:
    raw = b"From: a@example.com\nSubject: s\nhello there\nNote: call me\n"
    mail = parse_mail(raw)
    assert mail.text == "hello there\nNote: call me\n"
    assert mail.header("Note") is None


def test_headers_only() -> None:
    mail = parse_mail(b"From: a@example.com\nSubject: only headers")
    assert mail.subject == "only headers"
    assert mail.text == ""


def test_obsolete_whitespace_before_colon() -> None:
    # RFC 5322 4.5.x obsolete syntax: whitespace between field name and colon.
    raw = b"From  : John Doe <jdoe@example.com>\r\nSubject   : Saying Hello\r\n\r\nHi.\r\n"
    mail = parse_mail(raw)
    assert mail.sender == Address("jdoe@example.com", "John Doe")
    assert mail.subject == "Saying Hello"


# --- subjects (B3: whole, decoded, unfolded) -----------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Grüße"),
        # RFC 2047 6.2: whitespace between adjacent encoded-words disappears.
        ("=?utf-8?q?Gr=C3=BC?= =?utf-8?q?=C3=9Fe?=", "Grüße"),
        ("=?UTF-8?B?R3LDvMOfZQ==?= and more", "Grüße and more"),
        ("Re: =?iso-8859-1?q?caf=E9?= time", "Re: café time"),
        ("=?iso-8859-1?q?caf=E9?=\n =?iso-8859-1?q?_au_lait?=", "café au lait"),
        # A UTF-8 sequence split across two words (broken, but real mailers do it).
        ("=?utf-8?b?w6Q=?==?utf-8?b?w7Y=?=", "äö"),
        ("=?utf-8?B?w6Q?=", "ä"),  # missing base64 padding
        ("=?utf-8*en?q?hello?=", "hello"),  # RFC 2231 language suffix
        ("=?x-unknown?q?plain?=", "plain"),
        ("Folded\n   subject\n\tline", "Folded   subject line"),
        ("=?utf-8?q?line=0Abreak=0D=00nul?=", "line break nul"),
        ("=?utf-8?q?bad=FF?=", "bad\ufffd"),
        ("=?broken", "=?broken"),
        # Raw 8-bit text inside an encoded word (broken mailers).
        ("=?utf-8?Q?Café_crème?=", "Café crème"),
    ],
)
def test_subject_decoding(header: str, expected: str) -> None:
    mail = parse_mail(build(f"From: a@example.com\nSubject: {header}"))
    assert mail.subject == expected
    assert "\n" not in mail.subject and "\r" not in mail.subject


def test_long_subject_is_never_truncated() -> None:
    words = [f"word{i}" for i in range(600)]
    # Folding inserts CRLF before existing whitespace; unfolding removes just the CRLF.
    folded = "\n ".join(" ".join(words[i : i + 8]) for i in range(0, len(words), 8))
    mail = parse_mail(build(f"From: a@example.com\nSubject: {folded}"))
    assert mail.subject == " ".join(words)


def test_long_encoded_subject() -> None:
    word = "=?utf-8?q?Sonne_qu=C3=A4lte?="
    mail = parse_mail(build("From: a@example.com\nSubject: " + "\n ".join([word] * 3000)))
    assert mail.subject == "Sonne quälte" * 3000


def test_utf8_headers_rfc6532() -> None:
    raw = "From: Jöhn <jdöe@mächine.example>\nSubject: Säying Hello\n\nhi\n".encode()
    mail = parse_mail(raw)
    assert mail.subject == "Säying Hello"
    assert mail.sender == Address("jdöe@mächine.example", "Jöhn")


def test_8bit_header_in_legacy_charset_uses_body_charset() -> None:
    raw = (
        b"From: a@example.com\nSubject: caf\xe9\n"
        b"Content-Type: text/plain; charset=iso-8859-1\n\ncaf\xe9\n"
    )
    mail = parse_mail(raw)
    assert mail.subject == "café"
    assert mail.text == "café\n"


# --- addresses --------------------------------------------------------------------------


def test_unparseable_address_entries_are_skipped() -> None:
    mail = parse_mail(
        build(
            'From: a@example.com\nTo: Mary Smith, <good@example.com>, "Bob" <BOB@EXAMPLE.NET>,'
            " @@@, undisclosed-recipients:;"
        )
    )
    assert mail.to == (Address("good@example.com"), Address("bob@example.net", "Bob"))
    assert any("Mary Smith" in d for d in mail.defects)


def test_display_name_with_newline_and_encoded_words() -> None:
    raw = build(
        'From: "=?utf-8?q?Ren=C3=A9e=0D=0AX-Injected=3A_yes?=" <renee@example.com>\n'
        "To: =?iso-8859-1?q?M=FCller?= <m@example.com>"
    )
    mail = parse_mail(raw)
    assert mail.sender is not None
    assert mail.sender.address == "renee@example.com"
    assert "\n" not in mail.sender.name and "\r" not in mail.sender.name
    assert mail.sender.name.startswith("Renée")
    assert mail.to == (Address("m@example.com", "Müller"),)


def test_encoded_words_cannot_change_the_address_structure() -> None:
    # ":" "," and CRLF inside an encoded-word are text, never list syntax.
    raw = build(
        "From: =?utf-8?q?Dana=0D=0ABcc:_x@evil.test?= <dana@users.test>\n"
        'To: "=?utf-8?q?Doe,_J?=" <j@example.com>, =?utf-8?q?J=C3=BCrgen?= =?utf-8?q?_M?= '
        "<jm@example.de>"
    )
    mail = parse_mail(raw)
    assert mail.sender == Address("dana@users.test", "Dana  Bcc: x@evil.test")
    assert mail.to == (Address("j@example.com", "Doe, J"), Address("jm@example.de", "Jürgen M"))


def test_multiple_to_headers_and_duplicates() -> None:
    mail = parse_mail(
        build("From: a@example.com\nTo: x@example.com\nTo: y@example.com, X@example.com")
    )
    assert mail.to == (Address("x@example.com"), Address("y@example.com"))


def test_no_from_gives_no_sender() -> None:
    mail = parse_mail(build("Subject: from a script\nTo: help@helpdesk.test"))
    assert mail.sender is None
    assert mail.message_id is None
    assert mail.date is None


def test_address_without_domain_dot_is_kept() -> None:
    mail = parse_mail(build("From: root@localhost\nTo: MAILER-DAEMON"))
    assert mail.sender == Address("root@localhost")
    assert mail.to == ()


# --- dates and ids ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Fri, 21 Nov 1997 09:55:06 -0600", dt.datetime(1997, 11, 21, 15, 55, 6, tzinfo=dt.UTC)),
        # RFC 5322 3.3: -0000 is "zone unknown": read as UTC, still aware.
        ("Fri, 21 Nov 1997 09:55:06 -0000", dt.datetime(1997, 11, 21, 9, 55, 6, tzinfo=dt.UTC)),
        ("21 Nov 97 09:55:06 GMT", dt.datetime(1997, 11, 21, 9, 55, 6, tzinfo=dt.UTC)),
        # RFC 5322 4.3 obsolete date syntax with comments and spaced colons.
        (
            "Fri, 21 Nov 1997 09(comment):   55  :  06 -0600",
            dt.datetime(1997, 11, 21, 15, 55, 6, tzinfo=dt.UTC),
        ),
        ("Tue, 06 Jun 2017 27:39:33 +0600", None),
        ("<HR>", None),
        ("", None),
    ],
)
def test_dates(value: str, expected: dt.datetime | None) -> None:
    mail = parse_mail(build(f"From: a@example.com\nDate: {value}"))
    assert mail.date == expected
    if mail.date is not None:
        assert mail.date.tzinfo is not None


def test_bad_date_is_a_defect() -> None:
    mail = parse_mail(build("From: a@example.com\nDate: yesterday at noon"))
    assert mail.date is None
    assert any("Date" in d for d in mail.defects)


@pytest.mark.parametrize(
    ("headers", "message_id", "in_reply_to", "references"),
    [
        ("Message-ID: <a@b>", "a@b", (), ()),
        ("Message-ID: bare@id.example", "bare@id.example", (), ()),
        (
            "Message-ID: <1234   @   local(blah)  .machine .example>",
            "1234@local.machine.example",
            (),
            (),
        ),
        ("Message-ID:", None, (), ()),
        ("Message-ID: <>", None, (), ()),
        ("In-Reply-To: <x@y> (John's message of Monday)", None, ("x@y",), ()),
        ("In-Reply-To: Your message of Monday", None, (), ()),
        ("References: <a@x> <b@x>\n\t<a@x> garbage <c@x>", None, (), ("a@x", "b@x", "c@x")),
        ("References: a@x b@x", None, (), ("a@x", "b@x")),
    ],
)
def test_message_ids(
    headers: str,
    message_id: str | None,
    in_reply_to: tuple[str, ...],
    references: tuple[str, ...],
) -> None:
    mail = parse_mail(build(f"From: a@example.com\n{headers}"))
    assert mail.message_id == message_id
    assert mail.in_reply_to == in_reply_to
    assert mail.references == references


# --- bodies (B22) -----------------------------------------------------------------------


ALTERNATIVE = """\
From: a@example.com
Subject: alt
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XYZ"
"""

ALTERNATIVE_BODY = """\
--XYZ
Content-Type: text/plain; charset=utf-8

Plain version.
--XYZ
Content-Type: text/html; charset=utf-8

<p onclick="steal()">HTML <b>version</b>.</p><script>alert(1)</script>
--XYZ--
"""


def test_alternative_prefers_text_plain() -> None:
    mail = parse_mail(build(ALTERNATIVE, ALTERNATIVE_BODY))
    assert mail.text == "Plain version."
    assert mail.html is not None
    assert "version" in mail.html
    assert "<script" not in mail.html and "onclick" not in mail.html
    assert mail.attachments == ()


def test_alternative_with_empty_plain_uses_html() -> None:
    body = ALTERNATIVE_BODY.replace("Plain version.", "  ")
    mail = parse_mail(build(ALTERNATIVE, body))
    assert mail.text == "HTML version."


def test_html_only_becomes_text() -> None:
    html = (
        "<html><head><style>p { color: red }</style><script>var x = 1;</script></head>"
        "<body><p>Fish &amp; chips &lt;3 &eacute;t&eacute;</p><script>evil()</script>"
        "<ul><li>one</li><li>two</li></ul></body></html>"
    )
    raw = build("From: a@example.com\nContent-Type: text/html; charset=utf-8", html)
    mail = parse_mail(raw)
    assert "Fish & chips <3 été" in mail.text
    assert "one" in mail.text and "two" in mail.text
    for gone in ("evil", "var x", "color", "<p>", "&amp;"):
        assert gone not in mail.text
    assert mail.html is not None and "<script" not in mail.html and "evil" not in mail.html


@pytest.mark.parametrize(
    ("charset", "payload", "expected", "defect"),
    [
        ("x-bogus-charset", b"caf\xc3\xa9", "café", "unknown charset"),
        ("x-bogus-charset", b"caf\xe9", "caf\ufffd", "unknown charset"),
        ("utf-8", b"ok \xff\xfe done", "ok \ufffd\ufffd done", "not valid"),
        ("iso-8859-1", b"\x93quoted\x94 caf\xe9", "\u201cquoted\u201d café", None),
        ("us-ascii", "naïve".encode(), "naïve", None),
        ("utf-7", b"Hi Mom -+Jjo--!", "Hi Mom -\u263a-!", None),
        ("gb2312", "中文".encode("gb18030"), "中文", None),
        ("base64", b"abc", "abc", "unknown charset"),  # a codec, but not a charset
        ('"utf-8"', "quoted label ✓".encode(), "quoted label ✓", None),
    ],
)
def test_charsets_degrade_never_raise(
    charset: str, payload: bytes, expected: str, defect: str | None
) -> None:
    head = f"From: a@example.com\nContent-Type: text/plain; charset={charset}\n\n".encode()
    mail = parse_mail(head + payload)
    assert mail.text == expected
    if defect:
        assert any(defect in d for d in mail.defects)


def test_no_charset_with_8bit_utf8() -> None:
    mail = parse_mail("From: a@example.com\n\nGrüße\n".encode())
    assert mail.text == "Grüße\n"


def test_quoted_printable_and_base64_bodies() -> None:
    qp = parse_mail(
        build(
            "From: a@example.com\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: quoted-printable",
            "Gr=C3=BC=C3=9Fe, a long=\n line\n",
        )
    )
    assert qp.text == "Grüße, a long line\n"
    b64 = parse_mail(
        build(
            "From: a@example.com\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: base64",
            base64.encodebytes("Grüße\r\n".encode()).decode(),
        )
    )
    assert b64.text == "Grüße\n"


def test_format_flowed_is_unwrapped() -> None:
    # RFC 3676: trailing space = soft break; quote depth change ends a paragraph.
    body = "This is a \nlong line.\n> quoted \n> more\nafter\n-- \nsig\n"
    mail = parse_mail(
        build("From: a@example.com\nContent-Type: text/plain; charset=utf-8; format=flowed", body)
    )
    assert mail.text == "This is a long line.\n> quoted more\nafter\n-- \nsig\n"


def test_nul_in_text_is_removed() -> None:
    mail = parse_mail(b"From: a@example.com\n\nab\x00c\n")
    assert mail.text == "abc\n"


# --- attachments ------------------------------------------------------------------------

MIXED = """\
From: a@example.com
Subject: files
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="BOUND"
"""


def mixed(*parts: str | bytes) -> bytes:
    chunks = [build(MIXED, b"")]
    for part in parts:
        chunks.append(b"--BOUND\n")
        chunks.append(part if isinstance(part, bytes) else part.encode())
        chunks.append(b"\n")
    chunks.append(b"--BOUND--\n")
    return b"".join(chunks)


BINARY = bytes(range(256)) + b"\x00\x00\r\n\x00\n\r\x00end"


def test_binary_attachment_with_nul_bytes_base64() -> None:
    encoded = base64.encodebytes(BINARY).decode()
    mail = parse_mail(
        mixed(
            "Content-Type: text/plain\n\nsee attached\n",
            "Content-Type: application/octet-stream\n"
            'Content-Disposition: attachment; filename="blob.bin"\n'
            f"Content-Transfer-Encoding: base64\n\n{encoded}",
        )
    )
    assert mail.text == "see attached\n"
    (attachment,) = mail.attachments
    assert attachment.filename == "blob.bin"
    assert attachment.content_type == "application/octet-stream"
    assert attachment.data == BINARY
    assert attachment.inline is False


def test_binary_attachment_with_nul_bytes_binary_transfer_encoding() -> None:
    part = (
        b"Content-Type: application/octet-stream\n"
        b"Content-Disposition: attachment; filename=raw.bin\n"
        b"Content-Transfer-Encoding: binary\n\n" + BINARY
    )
    mail = parse_mail(mixed("Content-Type: text/plain\n\nbody", part))
    (attachment,) = mail.attachments
    assert attachment.data == BINARY


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        # RFC 2231 extended parameter, percent-encoded UTF-8.
        ("attachment; filename*=UTF-8''%E2%82%AC%20rates.pdf", "€ rates.pdf"),
        # RFC 2231 continuations.
        ("attachment; filename*0*=UTF-8''%E2%82%AC%20ra; filename*1=tes.pdf", "€ rates.pdf"),
        # RFC 2047 inside a quoted parameter: forbidden but everywhere.
        ('attachment; filename="=?UTF-8?B?w6TDtsO8LnBkZg==?="', "äöü.pdf"),
        ('attachment; filename="=?iso-8859-1?Q?R=E9sum=E9=2Epdf?="', "Résumé.pdf"),
        ("attachment; filename*=x-bogus''%E2%82%AC.pdf", "€.pdf"),
        ('attachment; filename="../../etc/passwd"', "_.._etc_passwd"),
        ('attachment; filename="C:\\\\Users\\\\me\\\\a.txt"', "C:_Users_me_a.txt"),
    ],
)
def test_attachment_filenames(disposition: str, expected: str) -> None:
    mail = parse_mail(
        mixed(
            "Content-Type: text/plain\n\nbody",
            f"Content-Type: application/pdf\nContent-Disposition: {disposition}\n\nPDF",
        )
    )
    (attachment,) = mail.attachments
    assert attachment.filename == expected


def test_filename_from_content_type_name() -> None:
    mail = parse_mail(
        mixed(
            "Content-Type: text/plain\n\nbody",
            "Content-Type: image/png; name*=UTF-8''%F0%9F%90%88.png\n\nPNG",
        )
    )
    assert mail.attachments[0].filename == "🐈.png"


def test_attachment_without_name_gets_one() -> None:
    mail = parse_mail(mixed("Content-Type: text/plain\n\nbody", "Content-Type: image/png\n\nPNG"))
    assert mail.attachments[0].filename == "attachment-1.png"


def test_nested_message_is_kept_as_eml() -> None:
    nested = (
        "Content-Type: message/rfc822\n\n"
        "From: inner@example.com\nSubject: The inner/one\nMessage-ID: <inner@example.com>\n\n"
        "inner body\n"
    )
    mail = parse_mail(mixed("Content-Type: text/plain\n\nouter", nested))
    assert mail.text == "outer"
    (attachment,) = mail.attachments
    assert attachment.content_type == "message/rfc822"
    assert attachment.filename == "The inner_one.eml"
    assert b"Subject: The inner/one" in attachment.data
    assert b"inner body" in attachment.data
    # The nested message is itself parseable mail.
    assert parse_mail(attachment.data).message_id == "inner@example.com"


def test_related_inline_image() -> None:
    raw = build(
        'From: a@example.com\nContent-Type: multipart/related; boundary="R"; start="<root@x>"',
        "--R\nContent-Type: image/gif\nContent-ID: <logo@x>\nContent-Transfer-Encoding: base64\n\n"
        "R0lGODlhAQABAAAAACw=\n"
        '--R\nContent-Type: text/html\nContent-ID: <root@x>\n\n<p>Hi <img src="cid:logo@x"></p>\n'
        "--R--\n",
    )
    mail = parse_mail(raw)
    assert mail.text == "Hi"
    assert mail.html is not None and 'src="cid:logo@x"' in mail.html
    (image,) = mail.attachments
    assert image.content_id == "logo@x"
    assert image.inline is True
    assert image.data == base64.b64decode("R0lGODlhAQABAAAAACw=")


def test_text_attachment_is_not_the_body() -> None:
    mail = parse_mail(
        mixed(
            'Content-Type: text/plain\nContent-Disposition: attachment; filename="log.txt"\n\nlog',
            "Content-Type: text/plain\n\nthe body",
        )
    )
    assert mail.text == "the body"
    assert [a.filename for a in mail.attachments] == ["log.txt"]


def test_calendar_in_alternative_is_kept() -> None:
    body = (
        "--XYZ\nContent-Type: text/plain\n\ninvite\n"
        "--XYZ\nContent-Type: text/calendar; method=REQUEST\n\nBEGIN:VCALENDAR\n"
        "--XYZ--\n"
    )
    mail = parse_mail(build(ALTERNATIVE, body))
    assert mail.text == "invite"
    assert [a.content_type for a in mail.attachments] == ["text/calendar"]
    assert mail.attachments[0].filename.endswith(".ics")


def test_wrong_boundary_is_recovered() -> None:
    raw = build(
        'From: a@example.com\nContent-Type: multipart/alternative; boundary="declared"',
        "--actual\nContent-Type: text/plain\n\nrecovered text\n--actual--\n",
    )
    mail = parse_mail(raw)
    assert mail.text == "recovered text"
    assert any("boundary" in d for d in mail.defects)


def test_missing_boundary_is_recovered_from_an_8bit_body() -> None:
    raw = build(
        'From: a@example.com\nContent-Type: multipart/mixed',
        "--XyZ\nContent-Type: text/plain; charset=utf-8\n\nGrüße\n--XyZ--\n",
    )
    mail = parse_mail(raw)
    assert mail.text == "Grüße"


def test_8bit_epilogue_with_a_dash_line_is_kept() -> None:
    raw = build(
        'From: a@example.com\nContent-Type: multipart/mixed; boundary="b"',
        "--b\nContent-Type: text/plain\n\nbody\n--b--\n--été\n",
    )
    mail = parse_mail(raw)
    assert mail.text == "body"
    [epilogue] = mail.attachments
    assert epilogue.filename == "epilogue.txt" and "été".encode() in epilogue.data


def test_unicode_escape_is_not_a_charset() -> None:
    raw = build("From: a@example.com\nContent-Type: text/plain; charset=unicode_escape",
                "a\\u0041b\n")
    assert parse_mail(raw).text.strip() == "a\\u0041b"  # not "aAb"


def test_parts_after_a_reused_boundary_are_kept() -> None:
    raw = build(
        'From: a@example.com\nContent-Type: multipart/mixed; boundary="B"',
        '--B\nContent-Type: multipart/alternative; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\ntext\n"
        "--B--\n\n"
        "--B\nContent-Type: application/zip; name=a.zip\n\nZIP\n"
        "--B--\n",
    )
    mail = parse_mail(raw)
    assert mail.text == "text"
    assert [a.filename for a in mail.attachments] == ["a.zip"]


def test_missing_close_boundary() -> None:
    raw = build(ALTERNATIVE, "--XYZ\nContent-Type: text/plain\n\ncut short")
    mail = parse_mail(raw)
    assert mail.text == "cut short"
    assert mail.defects


def test_huge_content_type_header_is_parsed_leniently() -> None:
    params = "".join(f"; p{i}=v" for i in range(20000))
    raw = build(
        f'From: a@example.com\nContent-Type: multipart/mixed; boundary="B"{params}',
        "--B\nContent-Type: text/plain\n\nstill here\n--B--\n",
    )
    mail = parse_mail(raw)
    assert mail.text == "still here"
    assert any("over-long" in d for d in mail.defects)


def test_deep_nesting_does_not_crash() -> None:
    depth = 60
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth)
    )
    tail = "".join(f"\n--b{i}--\n" for i in reversed(range(depth)))
    raw = ("From: a@example.com\n" + head + "Content-Type: text/plain\n\ndeep" + tail).encode()
    mail = parse_mail(raw)
    assert isinstance(mail, ParsedMail)
    assert any("deeper" in d for d in mail.defects)


# --- not mail ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b" \r\n\t\n", "empty"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600), "not-rfc5322"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not-rfc5322"),
        (b"PK\x03\x04\x14\x00\x00\x00", "not-rfc5322"),
        (b"\x00\x01\x02binary junk\x00\xff", "not-rfc5322"),
        (b"Dear customer,\nthis file has no header lines at all.\n", "no-headers"),
        (b"Hello: world\nNot: mail\n\nbody\n", "no-headers"),
    ],
)
def test_not_mail(raw: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_mail(raw)
    assert caught.value.reason == reason
    assert caught.value.detail


def test_parse_error_attributes() -> None:
    error = ParseError("no-headers", "nothing")
    assert (error.reason, error.detail) == ("no-headers", "nothing")
    assert "no-headers" in str(error)


# --- never anything but ParseError -------------------------------------------------------

SEED_MESSAGE = build(MIXED, b"") + (
    b"--BOUND\nContent-Type: text/plain; charset=utf-8\n\nhello =?utf-8?q?x?=\n"
    b"--BOUND\nContent-Type: message/rfc822\n\nFrom: x@y\nSubject: =?utf-8?b?w6Q=?=\n\nin\n"
    b"--BOUND\nContent-Type: application/octet-stream; name*=utf-8''a%20b\n"
    b"Content-Transfer-Encoding: base64\n\nAAEC\n--BOUND--\n"
)


def check(raw: bytes) -> None:
    try:
        mail = parse_mail(raw)
    except ParseError as error:
        assert error.reason
        return
    for text in (mail.subject, *(value for _, value in mail.headers)):
        assert "\n" not in text and "\r" not in text
    everything = [mail.subject, mail.text, mail.html or "", *mail.defects]
    everything += [a.filename for a in mail.attachments]
    everything += [address.name for address in (*mail.to, *mail.cc, *mail.reply_to)]
    for text in everything:
        text.encode("utf-8")  # no lone surrogates: storable as UTF-8


def test_mutations_of_a_message_never_crash() -> None:
    rng = random.Random(20240604)
    for _ in range(400):
        data = bytearray(SEED_MESSAGE)
        for _ in range(rng.randint(1, 12)):
            position = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[position] = rng.randrange(256)
            elif choice < 0.7:
                del data[position : position + rng.randint(1, 40)]
            else:
                data[position:position] = rng.choice(
                    [b"\n", b"\r", b"--BOUND\n", b"=?", b"?=", b"\x00", b":", b"\n\n", b";"]
                )
        check(bytes(data))
    for cut in range(0, len(SEED_MESSAGE), 7):
        check(SEED_MESSAGE[:cut])


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    check(raw)


_HEADER_NAMES = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "References",
    "Content-Type",
    "Content-Disposition",
    "Content-Transfer-Encoding",
    "X-Loop",
]
header_line = st.builds(
    lambda name, value: f"{name}: {value}",
    st.sampled_from(_HEADER_NAMES),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(header_line, min_size=1, max_size=8), st.binary(max_size=300))
def test_arbitrary_headers_never_crash(lines: list[str], body: bytes) -> None:
    raw = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n\n" + body
    check(raw)
