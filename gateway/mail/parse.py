"""Turn the raw bytes of one email into a `ParsedMail`, or say why they are not one.

This module's sole purpose is decoding: headers (RFC 5322, RFC 2047, RFC 6532),
addresses, the body text (B22) and the attachments (RFC 2045-2049, RFC 2231).
It takes no decisions about tickets. `parse_mail` raises only `ParseError`, and
only for input that is not plausibly an email (empty, binary, no header
lines); every defect in mail that is plausibly mail is worked around and
listed in `ParsedMail.defects` instead (B20).

Speed: the stdlib parser builds the MIME tree (with `policy.default`, its
header objects memoised: `_MemoPolicy`); header values are then read from the
raw (name, value) pairs, and plain address lists are split by
`_simple_addresses`, so the slow header registry runs only for unusual address
lists. Encoded-words are decoded here, merging adjacent words of one charset so
that multi-byte characters split across words survive.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime as dt
import functools
import quopri
import re
from email import errors as email_errors
from email import policy as email_policy
from email import utils as email_utils
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from io import BytesIO

from gateway.mail.html import html_to_text, sanitize_html
from gateway.message import Address, Attachment, ParsedMail

__all__ = ["ParseError", "parse_mail"]


class ParseError(Exception):
    """The bytes are not an email; `reason` is a short code for quarantine.

    Reasons: "empty", "not-rfc5322" (binary formats), "no-headers", and
    "parser-failure" (an unexpected internal error; the message is kept).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _MemoPolicy(email_policy.EmailPolicy):
    """`policy.default` whose fetched header objects are memoised.

    The feed parser asks each part for its content type four or five times
    (get_content_type, get_content_maintype, get_boundary, close) and every
    ask builds a fresh registry header object, a new class included (some 40%
    of the time parse_mail took for a plain message). The objects are a pure
    function of (name, raw value), are never mutated and never leave this
    module, so one can serve every ask; an LRU keeps the values mail repeats
    ("text/plain; charset=utf-8").
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        if hasattr(value, "name") or len(value) > _MAX_MEMO_HEADER:
            return super().header_fetch_parse(name, value)  # type: ignore[no-any-return]
        return _memo_header(self, name, value)


# Bounds the memo's memory: a header object costs 15 kB for a typical
# Content-Type and up to ~120 kB for a crafted 256-character one, so at most
# 64 objects (~8 MB worst case, ~1 MB typical). 64 holds the values every
# message shares plus all those of one ordinary message while it is parsed.
_MAX_MEMO_HEADER = 256
_MEMO_HEADERS = 64


@functools.lru_cache(maxsize=_MEMO_HEADERS)
def _memo_header(policy: _MemoPolicy, name: str, value: str) -> str:
    return email_policy.EmailPolicy.header_fetch_parse(policy, name, value)  # type: ignore[no-any-return]


_PARSER = BytesParser(policy=_MemoPolicy())
# The policy.default header registry parses Content-* headers far more slowly
# than compat32 (seconds for a crafted 80 kB Content-Type); such mail is parsed
# with compat32, which builds the same tree.
_COMPAT_PARSER = BytesParser(policy=email_policy.compat32)
_HOSTILE_MIME_HEADER = re.compile(
    rb"^content-(?:type|disposition)[ \t]*:(?:[^\r\n]|\r?\n[ \t]|\r[ \t]){2000}", re.I | re.M
)
# Serialising nested messages must never refold: keep header bytes as received.
_GEN_POLICY = email_policy.default.clone(refold_source="none", linesep="\r\n")
_GEN_FALLBACK_POLICY = email_policy.compat32.clone(linesep="\r\n")

# Magic numbers of files that end up in mailboxes but are not RFC 5322.
_BINARY_MAGIC = (
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "Outlook .msg / OLE2 compound document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"%PDF-", "PDF document"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x78\x9f\x3e\x22", "TNEF (winmail.dat) data"),
)
# A field name is printable ASCII except ":" (RFC 5322 3.6.8); obsolete syntax
# allows whitespace before the colon (RFC 5322 4.5), e.g. "Subject  : hi".
_OBS_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.M)
_HEADER_END = re.compile(rb"\r\n\r\n|\n\r?\n|\r\r")
_FIELD_START = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_MAX_STRAY_LINES = 2
# At least one header must be one that mail actually carries, otherwise any
# text file whose first line contains a colon would count as mail.
_KNOWN_HEADERS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "received",
        "return-path",
        "delivered-to",
        "envelope-to",
        "mime-version",
        "comments",
        "keywords",
        "user-agent",
        "organization",
        "importance",
        "priority",
        "precedence",
        "auto-submitted",
        "authentication-results",
        "received-spf",
        "dkim-signature",
        "domainkey-signature",
        "errors-to",
        "disposition-notification-to",
        "original-recipient",
        "apparently-to",
        "newsgroups",
        "path",
        "status",
    }
)
_KNOWN_PREFIXES = ("x-", "list-", "resent-", "content-", "arc-", "dkim-", "thread-")

# Line breaks a header value must not carry into anything built from it
# (str.splitlines treats all of these as line ends), then other controls.
_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")
_FOLD = re.compile(r"\r\n|\r|\n")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_COMMENT = re.compile(r"\([^()]*\)")
# Only from the first blank before a colon: `\s*:` tried at every blank of a long
# run would be quadratic.
_TIME_COLON = re.compile(r"(?<!\s)\s*:\s*")
# For str patterns \s matches exactly the characters str.isspace() accepts.
_SPACE_OR_COMMENT = re.compile(r"[\s(]")
_BAD_DOMAIN_CHAR = re.compile(r"[\s<>,;@]")
_BAD_LOCAL_CHAR = re.compile(r"[\s<>]")
# RFC 2047 2: =?charset?encoding?encoded-text?= (charset may carry an RFC 2231
# language suffix, "utf-8*en"). Encoded text may not contain "?"; spaces are
# tolerated because broken mailers put them there.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_MASK = re.compile(r"=EW(\d+)=")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_PARAM = re.compile(r';\s*([!#-\'*+.0-9A-Z^-z|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
# RFC 2046 5.1.1: a delimiter line is "--" and the boundary (1-70 characters).
# A delimiter line: boundaries are printable ASCII (RFC 2046 5.1.1), the rest of a
# body may be any bytes.
_BOUNDARY_LINE = re.compile(rb'^--([!#-\[\]-~]{1,70})[ \t]*\r?$', re.M)
_TOKEN = re.compile(r"\s*([^\s;(]*)")

# Charset labels mail uses for what is really a superset, mapped to the
# superset (the WHATWG Encoding Standard does the same): valid input decodes
# identically, and the extra characters real mail contains decode too.
_CHARSET_ALIASES = {
    "us-ascii": "windows-1252",
    "ascii": "windows-1252",
    "iso-8859-1": "windows-1252",
    "iso8859-1": "windows-1252",
    "latin1": "windows-1252",
    "latin-1": "windows-1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "unicode-1-1-utf-7": "utf-7",
    "iso-8859-8-i": "iso-8859-8",
    "utf8": "utf-8",
}
# Labels that name no charset at all.
_NO_CHARSET = frozenset({"", "none", "unknown", "unknown-8bit", "x-unknown", "default"})
# Python registers codecs that are not charsets; mail must not select them.
_NOT_CHARSETS = frozenset(
    # As codecs.lookup() names them.
    {"undefined", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "mbcs", "oem"}
)

# The plain address-list shapes `_simple_addresses` handles (RFC 5322 3.4:
# atext, dot-atom, quoted-string; blanks only, so no comments). Possessive
# quantifiers keep matching linear on hostile input.
_SIMPLE_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_SIMPLE_QUOTED = r'"[ !#-\[\]-~]*+"'
_SIMPLE_DOT_ATOM = rf"{_SIMPLE_ATEXT}++(?:\.{_SIMPLE_ATEXT}++)*+"
_SIMPLE_SPEC = rf"{_SIMPLE_DOT_ATOM}@{_SIMPLE_DOT_ATOM}"
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*+(?:(?:(?P<phrase>(?:{_SIMPLE_ATEXT}++|{_SIMPLE_QUOTED})"
    rf"(?:[ \t]*+(?:{_SIMPLE_ATEXT}++|{_SIMPLE_QUOTED}))*+)[ \t]*+)?<(?P<angle>{_SIMPLE_SPEC})>"
    rf"|(?P<bare>{_SIMPLE_SPEC}))[ \t]*+(?:,|\Z)"
)
_SIMPLE_WORD = re.compile(rf"{_SIMPLE_ATEXT}++|{_SIMPLE_QUOTED}|[ \t]++")

_MAX_DEPTH = 40
_MAX_REGISTRY_ADDRESS_HEADER = 8192

_DEFECT_TEXT: dict[type[email_errors.MessageDefect], str] = {
    email_errors.MissingHeaderBodySeparatorDefect: (
        "header block not ended by a blank line; the rest was read as body"
    ),
    email_errors.StartBoundaryNotFoundDefect: (
        "MIME boundary declared but not found; the part was kept whole"
    ),
    email_errors.CloseBoundaryNotFoundDefect: "closing MIME boundary missing",
    email_errors.FirstHeaderLineIsContinuationDefect: "first header line is a continuation",
    email_errors.MisplacedEnvelopeHeaderDefect: "mbox 'From ' line inside the headers",
    email_errors.NoBoundaryInMultipartDefect: "multipart without a boundary parameter",
    email_errors.MultipartInvariantViolationDefect: "multipart content type but no subparts",
    email_errors.InvalidMultipartContentTransferEncodingDefect: (
        "multipart with a Content-Transfer-Encoding other than 7bit/8bit/binary"
    ),
    email_errors.UndecodableBytesDefect: "undecodable bytes",
    email_errors.InvalidBase64PaddingDefect: "base64 with wrong padding",
    email_errors.InvalidBase64CharactersDefect: "invalid characters in base64 data",
    email_errors.InvalidBase64LengthDefect: "base64 data of impossible length",
}


def parse_mail(raw: bytes) -> ParsedMail:
    """Decode one message. Raises `ParseError` (and nothing else) for non-mail."""
    try:
        return _parse(bytes(raw))
    except ParseError:
        raise
    except Exception as exc:  # the contract: a ParsedMail or a ParseError, always
        raise ParseError("parser-failure", f"{type(exc).__name__}: {exc}") from exc


def _parse(raw: bytes) -> ParsedMail:
    # Leading blank lines would make the whole message a body (RFC 5322 2.1).
    data = raw.lstrip(b" \t\r\n")
    if not data:
        raise ParseError("empty", "no bytes" if not raw else "only whitespace")
    for magic, what in _BINARY_MAGIC:
        if data.startswith(magic):
            raise ParseError("not-rfc5322", f"{what}, not an RFC 5322 message")

    defects: list[str] = []
    msg = _parse_tree(data, defects)
    if not msg.keys() or any(
        isinstance(d, email_errors.MissingHeaderBodySeparatorDefect) for d in msg.defects
    ):
        msg = _retry_header_block(data, msg, defects)
    names = [name.lower() for name, _ in msg.raw_items()]
    if not names:
        if b"\x00" in data[:1024]:
            raise ParseError("not-rfc5322", "binary data without header lines")
        raise ParseError("no-headers", "no header lines before the body")
    if not any(_is_known(n) for n in names):
        raise ParseError("no-headers", f"no known header field (saw {', '.join(names[:5])})")

    hint = _param(_raw_header(msg, "content-type"), "charset")
    items = [(name, _repair_8bit(value, hint)) for name, value in msg.raw_items()]
    headers = tuple((name, _header_text(value)) for name, value in items)

    # Field values by lower-case name, in order: looked up seven times below.
    by_name: dict[str, list[str]] = {}
    for name, (_, value) in zip(names, items, strict=True):
        by_name.setdefault(name, []).append(value)

    def every(name: str) -> list[str]:
        return by_name.get(name, [])

    def first(name: str) -> str | None:
        values = every(name)
        return values[0] if values else None

    walker = _Walker(defects)
    walker.walk(msg, 0)
    walker.collect_defects(msg)
    text = walker.text
    if text is None or (not text.strip() and walker.html is not None):
        text = html_to_text(walker.html) if walker.html is not None else (text or "")

    senders = _addresses("From", every("from")[:1], defects)
    return ParsedMail(
        subject=next((value for key, value in headers if key.lower() == "subject"), ""),
        sender=senders[0] if senders else None,
        to=_addresses("To", every("to"), defects),
        cc=_addresses("Cc", every("cc"), defects),
        reply_to=_addresses("Reply-To", every("reply-to"), defects),
        date=_date(first("date"), defects),
        message_id=_first_id(first("message-id")),
        in_reply_to=_ids(first("in-reply-to")),
        references=_ids(" ".join(every("references"))),
        text=text,
        html=sanitize_html(walker.html) if walker.html is not None else None,
        attachments=tuple(walker.attachments),
        headers=headers,
        defects=tuple(dict.fromkeys(_clean(d) for d in defects)),
    )


def _parse_tree(data: bytes, defects: list[str]) -> Message:
    if _HOSTILE_MIME_HEADER.search(data) is None:
        try:
            return _PARSER.parsebytes(data)
        except Exception as exc:
            defects.append(f"stdlib parser failed ({type(exc).__name__}); parsed leniently")
    else:
        defects.append("over-long Content-Type/Content-Disposition header; parsed leniently")
    return _COMPAT_PARSER.parsebytes(data)


def _retry_header_block(data: bytes, msg: Message, defects: list[str]) -> Message:
    """Re-parse when the header block ended early on a repairable line.

    Two things end it although headers follow: obsolete `Name  :` fields
    (RFC 5322 4.5 allows whitespace before the colon) and a stray line
    without a colon (a broken fold). Stray lines become continuations of the
    field before them, so their text is kept.
    """
    match = _HEADER_END.search(data)
    end = match.start() if match else len(data)
    lines = data[:end].splitlines(keepends=True)
    stray = [
        i
        for i, line in enumerate(lines)
        if not (_FIELD_START.match(line) or line[:1] in b" \t" or (i == 0 and line[:5] == b"From "))
    ]
    repaired = False
    if stray and len(stray) <= _MAX_STRAY_LINES and stray[0] > 0:
        following = [
            m.group(1) for line in lines[stray[-1] + 1 :] if (m := _FIELD_START.match(line))
        ]
        if any(_is_known(name.decode("ascii").lower()) for name in following):
            for i in stray:
                lines[i] = b" " + lines[i]
            repaired = True
    head = b"".join(lines)
    obsolete = _OBS_FIELD.search(head) is not None
    if not (repaired or obsolete):
        return msg
    fixed = _parse_tree(_OBS_FIELD.sub(rb"\1:", head) + data[end:], defects)
    if len(fixed.keys()) <= len(msg.keys()):
        return msg
    if obsolete:
        defects.append("obsolete header syntax (whitespace before ':') normalised")
    if repaired:
        defects.append("stray line in the header block read as a continuation")
    return fixed


def _is_known(name: str) -> bool:
    return name in _KNOWN_HEADERS or name.startswith(_KNOWN_PREFIXES)


# --- header text -----------------------------------------------------------


def _clean(text: str) -> str:
    """Make a string safe for a header or a database: no breaks, controls, surrogates."""
    text = _fix_surrogates(text)
    text = _CONTROLS.sub("", _BREAKS.sub(" ", text))
    return text.strip()


def _fix_surrogates(text: str) -> str:
    if not _SURROGATE.search(text):
        return text
    try:
        # Escaped raw bytes (surrogateescape): read them as UTF-8 (RFC 6532).
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def _repair_8bit(value: str, hint: str | None) -> str:
    """Raw 8-bit header bytes as text: UTF-8 (RFC 6532), else the body's charset."""
    if not _SURROGATE.search(value):
        return value
    try:
        raw = value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _bytes_to_text(raw, hint)[0]


def _header_text(value: str) -> str:
    """Unfold, decode RFC 2047 encoded-words, and clean one header value."""
    return _clean(_decode_words(_FOLD.sub("", value)))


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words anywhere in `value` (leniently)."""
    if "=?" not in value:
        return value
    # (charset, bytes) for a run of encoded-words, str for the text between them.
    pieces: list[tuple[str, bytearray] | str] = []
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        pos = match.end()
        # RFC 2047 6.2: whitespace between adjacent encoded-words is ignored.
        if between and not (between.isspace() and pieces and isinstance(pieces[-1], tuple)):
            pieces.append(between)
        charset = match.group(1).split("*", 1)[0].lower()
        data = _word_bytes(match.group(2), match.group(3))
        last = pieces[-1] if pieces else None
        if isinstance(last, tuple) and last[0] == charset:
            # Joining before decoding keeps characters split across words (in place:
            # a run of thousands of words must not be copied once per word).
            last[1].extend(data)
        else:
            pieces.append((charset, bytearray(data)))
    if pos < len(value):
        pieces.append(value[pos:])
    return "".join(
        piece
        if isinstance(piece, str)
        else _bytes_to_text(bytes(piece[1]), piece[0], prefer_utf8=False)[0]
        for piece in pieces
    )


def _word_bytes(encoding: str, text: str) -> bytes:
    # Broken mailers put raw 8-bit text inside a word; by now it is decoded text.
    raw = text.encode("utf-8", "surrogateescape")
    if encoding in "qQ":
        # RFC 2047 4.2: "_" is a space, =XX a byte.
        return binascii.a2b_qp(raw, header=True)
    raw = _NOT_BASE64.sub(b"", raw)
    raw = raw[: len(raw) - len(raw) % 4] if len(raw) % 4 == 1 else raw
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        return text.encode("ascii", "replace")


def _param(value: str | None, name: str) -> str | None:
    """One parameter of a MIME header (RFC 2045 5.1), unquoted; None if absent."""
    if not value:
        return None
    for match in _PARAM.finditer(value):
        if match.group(1).lower() == name:
            found = match.group(2).strip()
            if found.startswith('"'):
                found = re.sub(r"\\(.)", r"\1", found[1:].removesuffix('"'))
            return found
    return None


# --- addresses, dates, ids ---------------------------------------------------


def _addresses(field: str, values: list[str], defects: list[str]) -> tuple[Address, ...]:
    result: list[Address] = []
    for value in values:
        # Encoded-words are masked while the list is split: decoded or not,
        # their content (":", "<", ",", CRLF ...) must not change the structure.
        masked, words = _mask_words(_FOLD.sub("", value))
        for name, spec in _split_addresses(field, masked):
            name, spec = _unmask(name, words), _unmask(spec, words)
            address = _valid_address(spec)
            if address is None:
                if spec or name:
                    defects.append(f"{field}: skipped unusable address {spec or name!r}")
                continue
            result.append(Address(address=address, name=_clean(_decode_words(name))))
    return tuple(dict.fromkeys(result))


def _split_addresses(field: str, value: str) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of an address list (RFC 5322 3.4)."""
    if len(value) > _MAX_REGISTRY_ADDRESS_HEADER:
        pairs = None
    else:
        pairs = _simple_addresses(value)
        if pairs is None:
            pairs = _registry_addresses(field, value)
    if pairs is not None:
        return pairs
    try:
        return email_utils.getaddresses([value])  # the lenient compat32 parser
    except Exception:
        return []


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """What the header registry returns for a plain list, ~100 times faster; else None.

    Only lists in the plain shapes (`a@b.c`, `Name <a@b.c>`, `"Q, N" <a@b.c>`),
    ASCII, without comments, groups, quoted local parts, domain literals,
    backslashes, dots in names or leftover "=?" are taken; anything else
    (anything the registry reads differently or repairs) returns None and goes
    to the registry. For these shapes the registry yields the addr-spec as
    written and the display name with quoted-strings unquoted and each run of
    blanks between words read as one space.
    """
    if "=?" in value:
        return None  # an encoded-word the mask did not take: the registry decodes it
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(value)
    while True:
        match = _SIMPLE_MAILBOX.match(value, pos)
        if match is None:
            return None
        phrase, angle = match.group("phrase"), match.group("angle")
        if angle is None:
            pairs.append(("", match.group("bare")))
        elif phrase is None:
            pairs.append(("", angle))
        else:
            name = "".join(
                " " if word[0] in " \t" else word[1:-1] if word[0] == '"' else word
                for word in _SIMPLE_WORD.findall(phrase)
            )
            pairs.append((name, angle))
        pos = match.end()
        if pos == end:
            return pairs if value[pos - 1] != "," else None  # no empty last member


def _registry_addresses(field: str, value: str) -> list[tuple[str, str]] | None:
    try:
        header = email_policy.default.header_factory(field, value)
        return [(a.display_name, a.addr_spec) for a in header.addresses]
    except Exception:  # the registry raises on some broken lists
        return None


def _mask_words(value: str) -> tuple[str, list[str]]:
    words: list[str] = []

    def mask(match: re.Match[str]) -> str:
        words.append(match.group(0))
        return f"=EW{len(words) - 1}="  # an RFC 5322 atom

    return (_ENCODED_WORD.sub(mask, value), words) if "=?" in value else (value, words)


def _unmask(text: str, words: list[str]) -> str:
    if not words or "=EW" not in text:
        return text
    return _MASK.sub(lambda m: words[int(m.group(1))] if int(m.group(1)) < len(words) else "", text)


def _valid_address(spec: str) -> str | None:
    spec = _fix_surrogates(spec).strip().lower()
    local, at, domain = spec.rpartition("@")
    if not at or not local or not domain:
        return None
    if _BAD_DOMAIN_CHAR.search(domain) or _CONTROLS.search(spec):
        return None
    if not local.startswith('"') and _BAD_LOCAL_CHAR.search(local):
        return None
    return spec


def _date(value: str | None, defects: list[str]) -> dt.datetime | None:
    if value is None:
        return None
    text = _clean(_FOLD.sub("", value))
    parsed = _parse_date(text)
    if parsed is None:
        # RFC 5322 4.3 (obs-date): comments and whitespace around the colons.
        parsed = _parse_date(_TIME_COLON.sub(":", _COMMENT.sub(" ", text)))
    if parsed is None:
        defects.append(f"unparseable Date header {text!r}")
        return None
    if parsed.tzinfo is None:
        # RFC 5322 3.3: "-0000" says the zone is unknown; the time is UTC.
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


def _parse_date(text: str) -> dt.datetime | None:
    try:
        return email_utils.parsedate_to_datetime(text)
    except Exception:  # ValueError, TypeError, OverflowError, IndexError on junk
        return None


def _ids(value: str | None) -> tuple[str, ...]:
    """Message-IDs in `value`, without angle brackets, in order, de-duplicated."""
    if not value:
        return ()
    value = _fix_surrogates(_FOLD.sub("", value))
    found = [_compact_id(m) for m in _ANGLE_ID.findall(value)]
    if not found:
        # No brackets at all (broken mailers): take bare tokens that look like ids.
        found = [_compact_id(tok.strip("<>,;")) for tok in value.split() if "@" in tok]
    return tuple(dict.fromkeys(i for i in found if i))


def _first_id(value: str | None) -> str | None:
    if not value:
        return None
    ids = _ids(value)
    if ids:
        return ids[0]
    tokens = _clean(_FOLD.sub("", value)).split()
    if not tokens:
        return None
    return tokens[0].strip("<>") or None


def _compact_id(text: str) -> str:
    # RFC 5322 4.5.4 (obs-id-left/right) allows CFWS inside the brackets.
    if _SPACE_OR_COMMENT.search(text):
        text = "".join(_COMMENT.sub("", text).split())
    return _CONTROLS.sub("", text)


# --- charsets ----------------------------------------------------------------


def _codec(label: str | None) -> str | None:
    """Python codec name for a MIME charset label, or None when unknown."""
    if label is None:
        return None
    label = label.strip().strip("\"'").lower()
    if label in _NO_CHARSET:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None
    return info.name


def _bytes_to_text(
    data: bytes, label: str | None, *, prefer_utf8: bool = True
) -> tuple[str, str | None]:
    """Decode with the labelled charset; never raises, degrades to U+FFFD.

    Returns the text and a problem description (None when the bytes were fine).
    Unlabelled and ASCII/Latin-1 labelled 8-bit data is tried as UTF-8 first
    (`prefer_utf8`): that is what such mail usually is today.
    """
    # RFC 2045 5.2: no charset parameter means US-ASCII.
    codec = _codec("us-ascii" if label is None else label)
    problem: str | None = None
    if codec is None:
        problem = f"unknown charset {label!r}, read as UTF-8"
        codec = "utf-8"
    elif codec == "cp1252" and prefer_utf8:
        try:
            return data.decode("utf-8"), None
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(codec), problem
    except (LookupError, UnicodeError, ValueError):
        problem = problem or f"bytes not valid in charset {label or codec!r}"
    try:
        return data.decode(codec, "replace"), problem
    except (LookupError, UnicodeError, ValueError):
        return data.decode("utf-8", "replace"), problem


# --- bodies and attachments --------------------------------------------------


def _unflow(text: str, delsp: bool) -> str:
    """Undo RFC 3676 format=flowed soft line breaks."""
    out: list[str] = []
    buffer = ""
    buffer_depth: int | None = None
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):  # RFC 3676 4.4: space-stuffing
            content = content[1:]
        if buffer_depth is not None and depth != buffer_depth:
            # RFC 3676 4.5: a change of quote depth ends the paragraph.
            out.append(">" * buffer_depth + (" " if buffer_depth else "") + buffer)
            buffer, buffer_depth = "", None
        # RFC 3676 4.3: the signature separator "-- " is never flowed.
        flowed = content.endswith(" ") and content != "-- "
        if flowed and delsp:
            content = content[:-1]
        buffer += content
        buffer_depth = depth
        if not flowed:
            out.append(">" * depth + (" " if depth else "") + buffer)
            buffer, buffer_depth = "", None
    if buffer_depth is not None:
        out.append(">" * buffer_depth + (" " if buffer_depth else "") + buffer)
    return "\n".join(out)


_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "application/pdf": ".pdf",
    "application/pgp-signature": ".asc",
    "application/pkcs7-signature": ".p7s",
    "application/x-pkcs7-signature": ".p7s",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
}


class _Walker:
    """Collects body text, HTML and attachments from one message tree (B22)."""

    def __init__(self, defects: list[str]) -> None:
        self.defects = defects
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[Attachment] = []
        self.body_found = False
        self.parts: list[Message] = []

    def walk(self, part: Message, depth: int, *, related: bool = False) -> None:
        self.parts.append(part)
        ctype = _content_type(part)
        if depth > _MAX_DEPTH:
            self.defects.append(f"MIME nesting deeper than {_MAX_DEPTH}; kept the rest whole")
            self._attach(part, ctype, _serialise(part), related=related)
            return
        if part.is_multipart():
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            if ctype.startswith("message/"):
                self._attach_message(part, ctype, children)
            elif ctype == "multipart/alternative" and not self.body_found:
                self._alternative(children, depth)
            elif ctype == "multipart/related" and not self.body_found and children:
                root = _related_root(part, children)
                self.walk(root, depth + 1)
                for child in children:
                    if child is not root:
                        self.walk(child, depth + 1, related=True)
            else:
                # mixed, signed, report, digest and unknown multiparts: in order;
                # the first text part is the body (RFC 2046 5.1.3, RFC 6522 3).
                for child in children:
                    self.walk(child, depth + 1, related=related)
            self._epilogue(part, ctype, depth, related=related)
            return
        if ctype.startswith("multipart/"):
            # The parser found no boundary, so the payload is the raw MIME text.
            # As bytes: get_payload() without decode turns 8-bit text into U+FFFD.
            payload = part.get_payload(decode=True)
            recovered = (_recover_multipart(payload, ctype)
                         if isinstance(payload, bytes) else None)
            if recovered is not None:
                self.defects.append(f"{ctype}: wrong or missing boundary; recovered from the body")
                self.walk(recovered, depth + 1, related=related)
                return
            ctype = "text/plain"
        if (
            not self.body_found
            and ctype in ("text/plain", "text/html")
            and not _is_attachment(part)
        ):
            content = self._leaf_text(part, ctype)
            if not content.strip() and not _filename(part):
                return  # a blank part holds nothing to keep; a later one may be the body
            self.body_found = True
            if ctype == "text/plain":
                self.text = content
            else:
                self.html = content
            return
        self._attach(part, ctype, _leaf_bytes(part), related=related)

    def _epilogue(self, part: Message, ctype: str, depth: int, *, related: bool) -> None:
        """Keep text after the closing delimiter (RFC 2046 5.1.1 says to ignore it).

        A nested multipart that reuses its parent's boundary closes the parent
        early, leaving real parts out here; those are parsed and kept.
        """
        epilogue = part.epilogue
        if not epilogue or epilogue.isspace():
            return
        recovered = _recover_multipart(epilogue.encode("ascii", "surrogateescape"),
                                       "multipart/mixed")
        if recovered is not None:
            self.defects.append(f"{ctype}: MIME parts after the closing boundary; kept")
            for child in recovered.get_payload():
                if isinstance(child, Message):
                    self.walk(child, depth + 1, related=related)
            return
        self.defects.append(f"{ctype}: text after the closing boundary; kept as an attachment")
        data = epilogue.encode("ascii", "surrogateescape")
        self._attach(part, "text/plain", data, filename="epilogue.txt")

    def _alternative(self, children: list[Message], depth: int) -> None:
        # RFC 2046 5.1.4: alternatives come in increasing order of preference,
        # so a later text/plain or text/html replaces an earlier one.
        text: str | None = None
        html: str | None = None
        for child in children:
            ctype = _content_type(child)
            if child.is_multipart() and not ctype.startswith("message/"):
                sub = _Walker(self.defects)
                sub.walk(child, depth + 1)
                self.parts.extend(sub.parts)
                self.attachments.extend(sub.attachments)
                text = sub.text if sub.text is not None else text
                html = sub.html if sub.html is not None else html
            elif ctype in ("text/plain", "text/html") and not _is_attachment(child):
                self.parts.append(child)
                if ctype == "text/plain":
                    text = self._leaf_text(child, ctype)
                else:
                    html = self._leaf_text(child, ctype)
            else:
                # text/calendar invitations and the like are content of their own.
                self.walk(child, depth + 1)
        if text is not None or html is not None:
            self.body_found = True
            self.text, self.html = text, html

    def _leaf_text(self, part: Message, ctype: str) -> str:
        content_type = _raw_header(part, "content-type")
        text, problem = _bytes_to_text(_leaf_bytes(part), _param(content_type, "charset"))
        if problem:
            self.defects.append(f"{ctype}: {problem}")
        text = _fix_surrogates(text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""))
        if ctype == "text/plain" and (_param(content_type, "format") or "").lower() == "flowed":
            delsp = (_param(content_type, "delsp") or "").lower() == "yes"
            text = _unflow(text, delsp)
        return text

    def _attach_message(self, part: Message, ctype: str, children: list[Message]) -> None:
        if ctype == "message/delivery-status":
            # RFC 3464 2.1: per-message and per-recipient field blocks.
            data = b"\r\n".join(_serialise(c) for c in children)
        elif children:
            data = _serialise(children[0])
            cte = (_raw_header(part, "content-transfer-encoding") or "").strip().lower()
            # RFC 2046 5.2.1 forbids encoding message/rfc822, but some clients do.
            if cte in ("base64", "quoted-printable"):
                data = _decode_cte(data, cte)
        else:
            data = b""
        filename = _filename(part)
        if not filename and ctype in ("message/rfc822", "message/global"):
            subject = _raw_header(children[0], "subject") if children else None
            name = _header_text(_repair_8bit(subject, None)) if subject else ""
            filename = _safe_name(name or "message") + ".eml"
        self._attach(part, ctype, data, filename=filename)

    def _attach(
        self,
        part: Message,
        ctype: str,
        data: bytes,
        *,
        filename: str | None = None,
        related: bool = False,
    ) -> None:
        if not filename:
            filename = _filename(part)
        if not filename:
            ext = _EXTENSIONS.get(ctype, ".txt" if ctype.startswith("text/") else ".bin")
            filename = f"attachment-{len(self.attachments) + 1}{ext}"
        disposition = _disposition(part)
        self.attachments.append(
            Attachment(
                filename=filename,
                content_type=ctype,
                data=data,
                content_id=_first_id(_raw_header(part, "content-id")),
                inline=disposition == "inline" or (related and disposition != "attachment"),
            )
        )

    def collect_defects(self, root: Message) -> None:
        seen: set[int] = set()
        for part in [root, *self.parts]:
            if id(part) in seen:
                continue
            seen.add(id(part))
            where = "message" if part is root else _content_type(part)
            for defect in part.defects:
                text = _DEFECT_TEXT.get(type(defect))
                if text is None:
                    detail = str(defect)
                    text = type(defect).__name__ + (f": {detail}" if detail else "")
                self.defects.append(f"{where}: {text}")


def _raw_header(part: Message, name: str) -> str | None:
    """First raw value of header `name` (lower case), bypassing the header registry."""
    for key, value in part.raw_items():
        if key.lower() == name:
            return value
    return None


def _content_type(part: Message) -> str:
    value = _raw_header(part, "content-type")
    if value is None:
        return part.get_default_type()
    match = _TOKEN.match(_FOLD.sub("", value))
    ctype = match.group(1).lower() if match else ""
    # RFC 2045 5.2: an invalid Content-Type means text/plain.
    return ctype if ctype.count("/") == 1 else "text/plain"


def _disposition(part: Message) -> str | None:
    value = _raw_header(part, "content-disposition")
    if value is None:
        return None
    match = _TOKEN.match(_FOLD.sub("", value))
    return match.group(1).lower() if match else None


def _is_attachment(part: Message) -> bool:
    return _disposition(part) == "attachment"


def _related_root(part: Message, children: list[Message]) -> Message:
    # RFC 2387 3.2: the "start" parameter names the root by Content-ID, else the first part.
    start = _param(_raw_header(part, "content-type"), "start")
    if start and start.strip():
        wanted = start.strip().strip("<>")
        for child in children:
            cid = _raw_header(child, "content-id")
            if cid is not None and cid.strip().strip("<>") == wanted:
                return child
    return children[0]


def _recover_multipart(payload: bytes, ctype: str) -> Message | None:
    """Parse `payload` as a `ctype` multipart, with the first delimiter line it contains."""
    match = _BOUNDARY_LINE.search(payload)
    if match is None:
        return None
    boundary = match.group(1).decode("ascii")
    head = f'Content-Type: {ctype}; boundary="{boundary}"\r\n\r\n'.encode()
    try:
        tree = _PARSER.parsebytes(head + payload)
    except Exception:
        return None
    return tree if tree.is_multipart() else None


def _leaf_bytes(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("ascii", "surrogateescape")
    return b""


def _decode_cte(data: bytes, cte: str) -> bytes:
    try:
        if cte == "base64":
            return base64.b64decode(b"".join(data.split()) + b"==", validate=False)
        return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data


def _serialise(part: Message) -> bytes:
    """Bytes of a (nested) message as it would be written to disk."""
    for policy in (_GEN_POLICY, _GEN_FALLBACK_POLICY):
        data = _flatten(part, policy)
        if data is not None:
            return data
    return b""


def _flatten(part: Message, policy: email_policy.Policy) -> bytes | None:
    buffer = BytesIO()
    try:
        BytesGenerator(buffer, mangle_from_=False, policy=policy).flatten(part)
    except Exception:  # broken headers can defeat the generator; compat32 is next
        return None
    return buffer.getvalue()


def _filename(part: Message) -> str:
    try:
        # get_filename decodes RFC 2231 (and, via policy.default, RFC 2047).
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        return ""
    # RFC 2047 words in a quoted parameter are not allowed but common.
    return _safe_name(_clean(_decode_words(_repair_8bit(str(name), None))))


def _safe_name(name: str) -> str:
    # A file name is a label, never a path.
    return name.replace("/", "_").replace("\\", "_").strip(". ")
