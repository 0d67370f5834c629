"""The message as it flows: what a channel hands the pipeline and what the daemon sends.

`Inbound` is what a channel adapter builds (raw bytes kept, envelope as the
channel saw it). `ParsedMail` is the normalised view the parser derives from an
email's bytes. `Outbound` is one message the daemon writes, before composition.
All are frozen, slotted dataclasses: the pipeline never mutates its input.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class Channel(enum.StrEnum):
    """Where a message came from (and where replies to its ticket go)."""

    EMAIL = "email"
    TELEGRAM = "telegram"
    WEB = "web"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message, exactly as its channel handed it over.

    For email, `raw` is the RFC 5322 bytes; `mail_from` is the envelope sender
    ("" for the null sender `<>`, None when the channel has no envelope, e.g. an
    IMAP mailbox); `rcpt_tos` the envelope recipients. `source` names the
    concrete adapter ("smtp", "imap:help@...", ...) for logs and quarantine.
    """

    channel: Channel
    raw: bytes
    received_at: dt.datetime
    source: str
    mail_from: str | None = None
    rcpt_tos: tuple[str, ...] = ()
    # Channel-specific identity for non-email channels (e.g. a Telegram update id).
    channel_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: lower-cased address for comparison, display name as given."""

    address: str
    name: str = ""

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment (or inline part that is not the body text)."""

    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class ParsedMail:
    """The normalised content of an email, as the pipeline needs it.

    Header-derived strings are already decoded (RFC 2047), unfolded and stripped
    of CR/LF, so nothing here can inject a header when copied into outbound mail.
    Message-IDs are stored without angle brackets.
    """

    subject: str
    sender: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    date: dt.datetime | None
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    text: str
    html: str | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]
    # Problems the parser worked around (bad charset, broken MIME, ...), for the audit trail.
    defects: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message the daemon writes, before it is composed into bytes."""

    sender: Address
    to: tuple[Address, ...]
    subject: str
    text: str
    cc: tuple[Address, ...] = ()
    reply_to: Address | None = None
    html: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    # RFC 3834: "auto-replied" for acknowledgements, "auto-generated" for
    # notifications; None for mail a person wrote (relayed agent replies).
    auto_submitted: str | None = None
    attachments: tuple[Attachment, ...] = ()
    extra_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
