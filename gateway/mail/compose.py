"""Outbound -> RFC 5322 bytes: the one place where the daemon's mail gets its wire form.

`compose()` turns an `Outbound` into CRLF-terminated, 7-bit bytes ready for any
SMTP server (B23): every header line is ASCII (non-ASCII text becomes RFC 2047
encoded words, non-ASCII attachment names RFC 2231 parameters), no line exceeds
998 octets, no CR/LF or other control character from inbound text reaches a
header, and there is never a Bcc header.

Why not `email.message.EmailMessage` with `policy.SMTP` for the serialisation?
On the Python we run (3.11.7) its header registry *decodes* anything in a header
value that looks like an RFC 2047 encoded word and refolds it as plain text, so
a subject or attachment name that contains the literal text
``=?utf-8?q?x=0D=0ABcc:_eve@example.org?=`` (which a customer can deliver to us
double-encoded) comes out as a real ``Bcc:`` header line; and a Message-ID longer
than one line in References/In-Reply-To is turned into encoded words, which
breaks threading for Outlook-style IDs. Both happen after CR/LF stripping, so
sanitising input is not enough. Writing headers and MIME structure here, with
the stdlib's codecs (binascii, base64, email.utils), closes both holes and is
also several times faster (this runs inside the DB transaction of every
notification). Tests parse every result back with `email.policy.default`.

`encode_address()` is the single check for an addr-spec; the transports use it
for the SMTP envelope so header and envelope always agree.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.utils import format_datetime

from gateway.message import Address, Attachment, Outbound

__all__ = ["ComposeError", "compose", "encode_address", "make_message_id"]

# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998.
_FOLD_AT = 78
_MAX_LINE = 998
# A word longer than this is never written literally (it becomes encoded words,
# which can be split), so that no folded header line can exceed 998 octets.
_MAX_LITERAL = 900
# RFC 2047 §2: an encoded word is at most 75 characters. "=?utf-8?b?" + 60 base64
# characters (45 octets) + "?=" is 72.
_EW_OCTETS = 45
# Long threads would grow References without bound; like most mail clients we keep
# the first ID (the thread root) and the most recent ones (RFC 5322 §3.6.4 only
# says what References SHOULD contain, not how much of it).
_MAX_REFERENCES = 30

# Control characters (C0, DEL, C1) and the Unicode line/paragraph separators that
# str.splitlines() -- and so parts of the email package -- treat as line breaks.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# RFC 5322 §3.2.3 atext.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
# RFC 5322 §3.4.1 dot-atom local part.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
# A host name (underscores tolerated: they occur in internal names) or a domain literal.
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z"
    r"|\[[A-Za-z0-9.:]+\]\Z"
)
# RFC 5322 §3.6.8 field-name: printable ASCII except ":".
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}\Z")
# RFC 2045 §5.1 type/subtype tokens, and the charset parameter we carry over.
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+\Z")
_CHARSET_PARAM = re.compile(r";\s*charset\s*=\s*\"?([A-Za-z0-9!#$%&'+^_`{}~.-]{1,40})\"?", re.I)
# RFC 3834 §5: auto-submitted value (a keyword) with optional parameters.
_AUTO_SUBMITTED = re.compile(r"[A-Za-z][A-Za-z0-9-]*(?:\s*;[ -~]*)?\Z")
# Our own Message-ID: msg-id content without brackets or white space (RFC 5322 §3.6.4).
_OWN_MSGID = re.compile(r"[!-;=?-~]{1,240}@[!-;=?-~]{1,240}\Z")
# What a Message-ID taken from inbound mail may not contain (it is ASCII-checked too).
_MSGID_JUNK = re.compile(r"[\x00-\x20\x7f<>]")
# Lines in a body that must not go out as 7bit (RFC 2045 §2.7: no NUL, no bare CR).
_NOT_7BIT = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_ASCII_BYTES = bytes(range(128))
_AFTER_SPACE = re.compile("(?<= )")
# RFC 2231 §7 attribute-char: what may stand unencoded in an extended parameter.
_ATTR_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$&+-.^_`|~"
)

# Header fields compose() writes itself, and trace/MIME fields nobody may add:
# an extra header can never override the sender, recipients or structure.
_RESERVED = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "auto-submitted",
        "x-auto-response-suppress",
        "x-loop",
        "return-path",
        "received",
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "dkim-signature",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
        "authentication-results",
    }
)
_RESERVED_PREFIXES = ("content-", "resent-")


class ComposeError(ValueError):
    """An Outbound cannot be written as valid mail (bad address, header name, date...)."""


# -- text helpers -------------------------------------------------------------------


def _clean(value: str) -> str:
    """Header text with every control character and line break turned into one space."""
    return " ".join(_CONTROLS.sub(" ", value).split())


def _ew(octets: bytes) -> str:
    return "=?utf-8?b?" + base64.b64encode(octets).decode("ascii") + "?="


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 "B" encoded words for `text`, each within the 75-character limit.

    Words are split between characters, never inside a UTF-8 sequence (RFC 2047
    §5), and preferably right after a space, which stays inside the earlier
    word: white space *between* encoded words is not part of the text (§6.2).
    (Python's own address parser wrongly keeps that white space in display
    names; splitting after a space limits the damage there to a doubled space.)
    """
    data = text.encode("utf-8", "replace")
    if len(data) <= _EW_OCTETS:
        return [_ew(data)]
    words: list[str] = []
    chunk = b""
    for piece in _AFTER_SPACE.split(text):
        octets = piece.encode("utf-8", "replace")
        if len(chunk) + len(octets) <= _EW_OCTETS:
            chunk += octets
            continue
        if chunk:
            words.append(_ew(chunk))
            chunk = b""
        if len(octets) <= _EW_OCTETS:
            chunk = octets
            continue
        for char in piece:  # one word too long for a single encoded word
            octets = char.encode("utf-8", "replace")
            if len(chunk) + len(octets) > _EW_OCTETS:
                words.append(_ew(chunk))
                chunk = b""
            chunk += octets
    if chunk:
        words.append(_ew(chunk))
    return words


def _literal_ok(word: str) -> bool:
    # "=?" is encoded even in ASCII text: a receiver would otherwise decode it as
    # an encoded word (RFC 2047 §6.1), and that is exactly the injection above.
    return word.isascii() and "=?" not in word and len(word) <= _MAX_LITERAL


def _unstructured(text: str) -> list[str]:
    """Tokens for an unstructured field (RFC 5322 §3.2.5), already cleaned.

    ASCII words stay readable (the ticket hook stays greppable); runs of words
    that need encoding become encoded words together with the spaces between
    them, because white space between adjacent encoded words is dropped when
    decoding (RFC 2047 §6.2).
    """
    if _literal_ok(text) and len(text) <= _FOLD_AT:
        return text.split(" ") if text else []
    tokens: list[str] = []
    run: list[str] = []
    for word in text.split(" "):
        if _literal_ok(word):
            if run:
                tokens.extend(_encoded_words(" ".join(run)))
                run = []
            tokens.append(word)
        else:
            run.append(word)
    if run:
        tokens.extend(_encoded_words(" ".join(run)))
    return tokens


def _phrase(name: str) -> list[str]:
    """Tokens for a display name (RFC 5322 §3.2.5 phrase), already cleaned.

    ASCII names are atoms or one quoted-string (so `Eve <evil@x>, bcc@y` stays a
    name, never a second mailbox); other names are encoded words, which RFC 2047
    §5(3) allows as a whole word of a phrase.
    """
    words = name.split(" ")
    if name.isascii() and "=?" not in name and all(len(w) <= _MAX_LITERAL for w in words):
        if all(_ATEXT.match(w) for w in words):
            return words
        quoted = name.replace("\\", "\\\\").replace('"', '\\"').split(" ")
        # FWS inside a quoted-string is allowed and unfolds back to the same space.
        quoted[0] = '"' + quoted[0]
        quoted[-1] = quoted[-1] + '"'
        # Escaping doubles `"` and `\`: a word of them could outgrow a line; such a
        # name goes as encoded words, which fold anywhere.
        if all(len(w) <= _MAX_LITERAL for w in quoted):
            return quoted
    return _encoded_words(name)


def _fold(name: str, tokens: Iterable[str]) -> str:
    """`name: tokens`, folded before a token that would pass 78 characters."""
    line = name + ":"
    lines: list[str] = []
    bare = True
    for token in tokens:
        if not bare and len(line) + 1 + len(token) > _FOLD_AT:
            lines.append(line)
            line = " " + token
        else:
            line += " " + token
        bare = False
    lines.append(line)
    return "\r\n".join(lines)


# -- addresses and identifiers --------------------------------------------------------


def encode_address(address: str) -> str:
    """The ASCII addr-spec for `address`, for headers and the SMTP envelope.

    IDNA-encodes a non-ASCII domain and quotes a local part that is not a
    dot-atom (RFC 5322 §3.4.1). Raises ComposeError for anything that is not one
    plain mailbox: white space, controls, angle brackets, no "@", a non-ASCII local
    part (that would need SMTPUTF8, RFC 6531, which we do not rely on), or a
    mailbox longer than RFC 5321 §4.5.3.1 allows.
    """
    if not address or _CONTROLS.search(address) or any(c.isspace() for c in address):
        raise ComposeError(f"not a mailbox address: {address!r}")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ComposeError(f"not a mailbox address: {address!r}")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    if not local or not local.isascii() or "<" in local or ">" in local:
        raise ComposeError(f"unsupported local part in {address!r}")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ComposeError(f"invalid domain in {address!r}") from None
    if not _DOMAIN.match(domain):
        raise ComposeError(f"invalid domain in {address!r}")
    if not _DOT_ATOM.match(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if len(local) > 64 or len(local) + 1 + len(domain) > 254:
        raise ComposeError(f"address too long: {address!r}")
    return f"{local}@{domain}"


def _mailbox(addr: Address) -> list[str]:
    spec = encode_address(addr.address)
    name = _clean(addr.name)
    if not name:
        return [spec]
    return [*_phrase(name), f"<{spec}>"]


def _address_list(addrs: Sequence[Address]) -> list[str]:
    tokens: list[str] = []
    for i, addr in enumerate(addrs):
        mailbox = _mailbox(addr)
        if i < len(addrs) - 1:
            mailbox[-1] += ","
        tokens.extend(mailbox)
    return tokens


def _msg_id(value: str) -> str | None:
    """`<id>` for a Message-ID taken from inbound mail, or None if it is not one token.

    An ID with white space, controls or stray brackets inside is dropped rather
    than repaired: glued-together text would match nothing anyway.
    """
    ident = value.strip()
    if ident.startswith("<") and ident.endswith(">"):
        ident = ident[1:-1]
    if (
        not ident
        or not ident.isascii()
        or len(ident) > _MAX_LITERAL
        or _MSGID_JUNK.search(ident) is not None
    ):
        return None
    return f"<{ident}>"


def _thread_ids(references: Sequence[str], in_reply_to: str | None) -> list[str]:
    """References: the thread so far, each ID once, the parent always last."""
    parent = _msg_id(in_reply_to) if in_reply_to else None
    seen: dict[str, None] = {}
    for value in references:
        ident = _msg_id(value)
        if ident is not None and ident != parent:
            seen[ident] = None
    ids = list(seen) + ([parent] if parent else [])
    if len(ids) > _MAX_REFERENCES:
        ids = [ids[0], *ids[-(_MAX_REFERENCES - 1) :]]
    return ids


_random = threading.local()


def _forget_random() -> None:
    # A forked child must not hand out the bytes its parent will hand out too.
    _random.buf, _random.pos = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def random_hex(n: int) -> str:
    """`n` bytes from the OS's CSPRNG, as hex, read 4 KiB at a time per thread.

    One getrandom() call per Message-ID released the GIL each time, and in a busy
    daemon every release costs a wait to get it back.
    """
    buf: bytes = getattr(_random, "buf", b"")
    pos: int = getattr(_random, "pos", 0)
    if pos + n > len(buf):
        buf, pos = os.urandom(max(4096, n)), 0
        _random.buf = buf
    _random.pos = pos + n
    return buf[pos:pos + n].hex()


def make_message_id(domain: str) -> str:
    """A new, globally unique Message-ID for `domain`, without angle brackets.

    Milliseconds since the epoch plus 80 random bits (RFC 5322 §3.6.4 leaves the
    left part to the generator; lower case hex survives systems that fold case).
    """
    host = domain.strip().rstrip(".")
    if host and not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ComposeError(f"invalid Message-ID domain: {domain!r}") from None
    if not host or host.startswith("[") or not _DOMAIN.match(host):
        raise ComposeError(f"invalid Message-ID domain: {domain!r}")
    return f"{time.time_ns() // 1_000_000:x}.{random_hex(10)}@{host.lower()}"


# -- MIME bodies ------------------------------------------------------------------------

# A leaf or multipart: its Content-* header lines and its encoded body (ending in CRLF).
_Part = tuple[list[str], bytes]


def _is_7bit(data: bytes) -> bool:
    return (
        data.isascii()
        and _NOT_7BIT.search(data) is None
        and max(map(len, data.split(b"\n"))) <= _MAX_LINE
    )


def _base64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _text_part(text: str, subtype: str) -> _Part:
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    if not normalised.endswith("\n"):
        normalised += "\n"
    data = normalised.encode("utf-8", "replace")
    # RFC 6152: 8bit content needs BODY=8BITMIME, which we cannot count on every
    # smarthost to offer, so bodies are 7bit, quoted-printable or base64.
    if _is_7bit(data):
        cte, body = "7bit", data.replace(b"\n", b"\r\n")
    elif 3 * len(data.translate(None, _ASCII_BYTES)) > len(data):
        # RFC 2046 §4.1.1: text is encoded in canonical form, with CRLF line breaks.
        cte, body = "base64", _base64(data.replace(b"\n", b"\r\n"))
    else:
        # Mostly ASCII: quoted-printable stays readable; long lines get soft breaks.
        cte = "quoted-printable"
        body = binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
    return [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        f"Content-Transfer-Encoding: {cte}",
    ], body


def _param(name: str, value: str) -> list[str]:
    """One MIME parameter: quoted-string if plain ASCII, else RFC 2231 extended form.

    RFC 2231 §3/§4: non-ASCII (or long) values are percent-encoded UTF-8, split
    into numbered continuations `name*0*=utf-8''...`, `name*1*=...` between
    characters so each line stays short.
    """
    if (
        value.isascii()
        and "=?" not in value
        and len(value) <= 60
        and all(" " <= c <= "~" for c in value)
    ):
        return [name + '="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"']
    pieces: list[str] = []
    current = ""
    for char in value:
        enc = (
            char
            if char in _ATTR_CHARS
            else "".join(f"%{b:02X}" for b in char.encode("utf-8", "replace"))
        )
        if len(current) + len(enc) > 60:
            pieces.append(current)
            current = ""
        current += enc
    pieces.append(current)
    if len(pieces) == 1:
        return [f"{name}*=utf-8''{pieces[0]}"]
    return [
        f"{name}*{i}*=utf-8''{piece}" if i == 0 else f"{name}*{i}*={piece}"
        for i, piece in enumerate(pieces)
    ]


# Attachments a mail client would render with their scripts (B23 allows no script in
# HTML parts): they travel as opaque files, to be saved rather than shown.
_ACTIVE_TYPES = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml"})


def _attachment_part(att: Attachment) -> _Part:
    raw_type = att.content_type.strip()
    ctype = raw_type.split(";", 1)[0].strip().lower()
    if not _MIME_TYPE.match(ctype) or ctype in _ACTIVE_TYPES:
        ctype = "application/octet-stream"
    params = ""
    if ctype.startswith("text/"):
        charset = _CHARSET_PARAM.search(raw_type)
        if charset:
            params = f'; charset="{charset.group(1)}"'
    cte, body = "base64", _base64(att.data)
    maintype = ctype.split("/", 1)[0]
    if maintype in ("message", "multipart"):
        # RFC 2046 §5.1, §5.2.1: these may not be base64-encoded. Embed a clean
        # 7-bit message as it is; anything else travels as opaque octets.
        normalised = att.data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if maintype == "message" and _is_7bit(normalised):
            if not normalised.endswith(b"\n"):
                normalised += b"\n"
            cte, body = "7bit", normalised.replace(b"\n", b"\r\n")
        else:
            ctype = "application/octet-stream"
    headers = [f"Content-Type: {ctype}{params}", f"Content-Transfer-Encoding: {cte}"]
    disposition = ["inline" if att.inline else "attachment"]
    filename = _clean(att.filename)
    if filename:
        disposition[0] += ";"
        params_list = _param("filename", filename)
        disposition.extend(p + ";" for p in params_list[:-1])
        disposition.append(params_list[-1])
    headers.append(_fold("Content-Disposition", disposition))
    if att.content_id:
        cid = _msg_id(att.content_id)
        if cid is not None:
            headers.append(f"Content-ID: {cid}")
    return headers, body


def _multipart(subtype: str, parts: Sequence[_Part]) -> _Part:
    # "=_" cannot occur in base64 or quoted-printable output, and the 128 random
    # bits make a collision with 7bit text negligible (RFC 2046 §5.1.1).
    boundary = "=_" + random_hex(16)
    delimiter = b"--" + boundary.encode("ascii")
    chunks: list[bytes] = []
    for headers, body in parts:
        chunks += [delimiter, b"\r\n", "\r\n".join(headers).encode("ascii"), b"\r\n\r\n", body]
        chunks.append(b"\r\n")
    chunks += [delimiter, b"--\r\n"]
    header = f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"'
    return [header], b"".join(chunks)


# -- the message -----------------------------------------------------------------------


def _extra_header(name: str, value: str) -> str:
    if not _FIELD_NAME.match(name):
        raise ComposeError(f"invalid header field name: {name!r}")
    lowered = name.lower()
    if lowered in _RESERVED or lowered.startswith(_RESERVED_PREFIXES):
        raise ComposeError(f"header {name!r} may not be set through extra_headers")
    return _fold(name, _unstructured(_clean(value)))


def compose(out: Outbound, *, message_id: str, date: datetime, loop_value: str) -> bytes:
    """The RFC 5322 bytes (CRLF line ends, 7-bit) for `out`.

    `message_id` comes from make_message_id() (no angle brackets); `date` must be
    timezone-aware; `loop_value` is our X-Loop value (B19). Raises ComposeError
    when `out` cannot be written as valid mail; nothing from `out` is trusted.
    """
    if not _OWN_MSGID.match(message_id):
        raise ComposeError(f"invalid Message-ID: {message_id!r}")
    if date.tzinfo is None or date.utcoffset() is None:
        raise ComposeError("Date must be timezone-aware")
    loop = _clean(loop_value)
    if not loop:
        raise ComposeError("X-Loop value is empty")

    lines = [
        _fold("From", _mailbox(out.sender)),
        # RFC 5322 §A.1.3: an empty group when every recipient is hidden.
        _fold("To", _address_list(out.to) if out.to else ["undisclosed-recipients:;"]),
    ]
    if out.cc:
        lines.append(_fold("Cc", _address_list(out.cc)))
    if out.reply_to is not None:
        lines.append(_fold("Reply-To", _mailbox(out.reply_to)))
    lines.append(_fold("Subject", _unstructured(_clean(out.subject))))
    lines.append("Date: " + format_datetime(date))
    lines.append(f"Message-ID: <{message_id}>")
    # RFC 5322 §3.6.4: In-Reply-To names the parent, References the thread so far
    # followed by the parent.
    if out.in_reply_to:
        parent = _msg_id(out.in_reply_to)
        if parent is not None:
            lines.append(f"In-Reply-To: {parent}")
    thread = _thread_ids(out.references, out.in_reply_to)
    if thread:
        lines.append(_fold("References", thread))
    if out.auto_submitted is not None:
        auto = _clean(out.auto_submitted)
        if not _AUTO_SUBMITTED.match(auto):
            raise ComposeError(f"invalid Auto-Submitted value: {out.auto_submitted!r}")
        lines.append(_fold("Auto-Submitted", auto.split(" ")))  # RFC 3834 §5
        if auto.split(";", 1)[0].strip().lower() != "no":
            # Asks Exchange/Outlook not to answer with out-of-office or other
            # automatic replies (MS-OXCMAIL §2.2.3.2.14), one more loop breaker.
            lines.append("X-Auto-Response-Suppress: All")
    lines.append(_fold("X-Loop", _unstructured(loop)))
    lines.extend(_extra_header(name, value) for name, value in out.extra_headers)
    lines.append("MIME-Version: 1.0")

    body_part = _text_part(out.text, "plain")
    if out.html:
        # RFC 2046 §5.1.4: alternatives in increasing order of preference.
        body_part = _multipart("alternative", [body_part, _text_part(out.html, "html")])
    if out.attachments:
        body_part = _multipart(
            "mixed", [body_part, *(_attachment_part(a) for a in out.attachments)]
        )
    lines.extend(body_part[0])

    head = "\r\n".join(lines)
    if not head.isascii():  # unreachable by construction; B23 is not left to chance
        raise ComposeError("non-ASCII header produced")
    if any(len(line) > _MAX_LINE for line in head.split("\r\n")):
        raise ComposeError("header line longer than 998 octets")
    return head.encode("ascii") + b"\r\n\r\n" + body_part[1]
